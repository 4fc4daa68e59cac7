//! The built-in example, for the command-line tool and the tests (feature `cli`; not part of
//! the embedding API): a chess-like dataset whose every value is a function of its sample index,
//! so a receiver can check each sample's content, not just its count. Starting loader processes
//! is the binary's (`bin/trainer-client/loaders.rs`), not the library's.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::Path,
};

use anyhow::{Context, bail};
use conveyor_proto::{DType, npy_header, splitmix64};

use crate::batch::Batch;

/// Piece planes x ranks x files of one position.
pub const BOARD_SHAPE: [u64; 3] = [12, 8, 8];
/// Number of distinct moves (AlphaZero's 8x8x73 move encoding).
pub const NUM_MOVES: u64 = 4672;

/// Board of sample `index`: plane `p` has a piece (1) on square `s` when bit `s` of a hash of
/// `(index, p)` is set and the square is not taken by an earlier plane.
pub fn board(index: u64) -> [i16; 768] {
    let mut out = [0i16; 768];
    let mut taken = 0u64;
    for plane in 0..12u64 {
        // Four independent hashes ANDed: about 1 square in 16 per plane, sparse like real positions.
        let hash = |salt: u64| splitmix64((index * 12 + plane) ^ (salt << 56));
        let bits = hash(1) & hash(2) & hash(3) & hash(4) & !taken;
        taken |= bits;
        for square in 0..64 {
            out[(plane * 64 + square) as usize] = ((bits >> square) & 1) as i16;
        }
    }
    out
}

/// Move label of sample `index`.
pub fn move_label(index: u64) -> i64 {
    (splitmix64(index ^ 0xabcd) % NUM_MOVES) as i64
}

/// Game result of sample `index`: the sign of the material balance (pieces on planes 0-5 minus
/// planes 6-11), so a model can learn it from the board.
pub fn result_label(index: u64) -> i8 {
    result_of(&board(index))
}

/// The result label of a board: -1, 0 or 1.
pub fn result_of(board: &[i16; 768]) -> i8 {
    let (white, black) = board.split_at(384);
    let balance: i32 =
        white.iter().map(|&v| i32::from(v)).sum::<i32>() - black.iter().map(|&v| i32::from(v)).sum::<i32>();
    balance.signum() as i8
}

/// Writes `board.npy` (`[n,12,8,8] int16`), `move.npy` (`int64`) and `result.npy` (`int8`)
/// into `dir`; the board field is split into shards of `shard_len` samples.
///
/// # Errors
/// The I/O error, naming the file.
pub fn write_chess_dataset(dir: &Path, num_samples: u64, shard_len: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let create = |name: String, dtype: DType, shape: &[u64]| -> anyhow::Result<BufWriter<File>> {
        let path = dir.join(name);
        let mut w = BufWriter::with_capacity(
            1 << 20,
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?,
        );
        w.write_all(&npy_header(dtype, shape))?;
        Ok(w)
    };
    let shard_len = shard_len.max(1);
    let mut start = 0;
    let mut shard = 0;
    while start < num_samples || shard == 0 {
        let len = shard_len.min(num_samples - start);
        let mut w = create(format!("board-{shard:05}.npy"), DType::Int16, &[len, 12, 8, 8])?;
        for index in start..start + len {
            let bytes: Vec<u8> = board(index).iter().flat_map(|v| v.to_le_bytes()).collect();
            w.write_all(&bytes)?;
        }
        w.flush()?;
        start += len;
        shard += 1;
    }
    let mut moves = create("move.npy".into(), DType::Int64, &[num_samples])?;
    let mut results = create("result.npy".into(), DType::Int8, &[num_samples])?;
    for index in 0..num_samples {
        moves.write_all(&move_label(index).to_le_bytes())?;
        results.write_all(&result_label(index).to_le_bytes())?;
    }
    moves.flush()?;
    results.flush()?;
    Ok(())
}

/// Whether `dir` already holds the example dataset with `num_samples` samples (the headers of
/// its files say so and the files are complete), so that it need not be written again.
pub fn holds_chess_dataset(dir: &Path, num_samples: u64) -> bool {
    let boards: Option<u64> = (0..)
        .map(|shard| dir.join(format!("board-{shard:05}.npy")))
        .take_while(|path| path.is_file())
        .map(|path| complete_rows(&path, 1536))
        .sum();
    boards == Some(num_samples)
        && complete_rows(&dir.join("move.npy"), 8) == Some(num_samples)
        && complete_rows(&dir.join("result.npy"), 1) == Some(num_samples)
}

/// The rows of a `.npy` file written by [`write_chess_dataset`], if the file holds all of them.
fn complete_rows(path: &Path, row_bytes: u64) -> Option<u64> {
    use std::io::Read;
    let mut head = [0u8; 4096];
    let mut file = File::open(path).ok()?;
    let len = file.read(&mut head).ok()?;
    let header_len = head[..len].iter().position(|&b| b == b'\n')? as u64 + 1;
    let text = String::from_utf8_lossy(&head[..header_len as usize]);
    let rest = &text[text.find("'shape': (")? + "'shape': (".len()..];
    let rows: u64 = rest[..rest.find([',', ')'])?].trim().parse().ok()?;
    (file.metadata().ok()?.len() == header_len + rows * row_bytes).then_some(rows)
}

/// Checks every sample of a chess batch against the generator.
///
/// # Errors
/// The first sample whose content is wrong.
pub fn check_chess_batch(batch: &Batch) -> anyhow::Result<()> {
    let (Some(boards), Some(moves), Some(results)) = (batch.field("board"), batch.field("move"), batch.field("result"))
    else {
        bail!("batch {} lacks a board, move or result field", batch.index);
    };
    for (row, &index) in batch.indices.iter().enumerate() {
        let expected_board = board(index);
        let expected: Vec<u8> = expected_board.iter().flat_map(|v| v.to_le_bytes()).collect();
        let got_board = &boards.data[row * 1536..(row + 1) * 1536];
        let got_move = i64::from_le_bytes(moves.data[row * 8..(row + 1) * 8].try_into().expect("8 bytes"));
        let got_result = results.data[row] as i8;
        if got_board != expected.as_slice() || got_move != move_label(index) || got_result != result_of(&expected_board)
        {
            bail!("sample {index} (row {row} of batch {}) has the wrong content", batch.index);
        }
    }
    Ok(())
}
