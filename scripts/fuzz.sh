#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 60): the .npy header parser, opening
# Zarr metadata, the loader's request handler on a small dataset, cursor parsing, --pipeline text, disk cache entry files, Zarr chunks through each bounded codec chain, ragged offsets, WebDataset shards and encoded images (decode_image). Needs the
# nightly toolchain; installs cargo-fuzz when it is missing. The corpus grows in fuzz/corpus/
# (git-ignored) from the committed seeds in fuzz/seeds/. A crash stops the run, leaves its input
# in fuzz/artifacts/TARGET/, and must become a regression test in the normal suite.
#   bash scripts/fuzz.sh 600        # a campaign: 10 minutes per target
#   bash scripts/fuzz.sh 15         # the smoke run .ci/run does
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo +nightly install cargo-fuzz --locked
fi
for target in npy_header zarr_metadata batch_request cursor pipeline disk_cache_entry zarr_chunk ragged_offsets webdataset_shard image_decode; do
    mkdir -p "fuzz/corpus/$target"
    echo "== fuzz $target for ${seconds}s"
    log="fuzz/corpus/$target.log"
    if ! cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=8192 -print_final_stats=1 >"$log" 2>&1; then
        tail -40 "$log"
        echo "FAIL: fuzz target $target crashed; its input is in fuzz/artifacts/$target/"
        exit 1
    fi
    grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb)" "$log" || true
    echo "corpus: $(find "fuzz/corpus/$target" -type f | wc -l) inputs"
done
