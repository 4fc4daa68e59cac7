//! `--dump DIR`: received samples written as `.npy` files numpy reads, in delivery order:
//! `__indices__.npy` and `__epochs__.npy` (int64, the sample index and epoch of every row; no
//! field may start with `__`, so no field's file can take their place) and `FIELD.npy` per field
//! (a name that is not a plain file name is refused, whatever the loader sends). After every batch, each file's header is rewritten in place with the
//! rows written so far (the header is padded to the length the run's total needs), so a client
//! killed at any moment leaves files numpy reads, holding every batch written until then.
//! `__indices__.npy` is committed last: its rows are complete in every other file, which may hold one
//! batch more if the client was killed between two commits. Memory stays at one batch whatever
//! the run's length.

use std::{
    fs::File,
    io::{BufWriter, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use trainer_client::{Batch, DType, DatasetInfo};

/// One `.npy` file being appended to.
#[derive(Debug)]
struct NpyWriter {
    path: PathBuf,
    file: BufWriter<File>,
    dtype: DType,
    sample_shape: Vec<u64>,
    header_len: usize,
    rows: u64,
}

impl NpyWriter {
    fn create(path: PathBuf, dtype: DType, sample_shape: &[u64], max_rows: u64) -> anyhow::Result<NpyWriter> {
        let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let header_len = header(dtype, sample_shape, max_rows, 0).len();
        let mut writer = NpyWriter {
            path,
            file: BufWriter::with_capacity(1 << 20, file),
            dtype,
            sample_shape: sample_shape.to_vec(),
            header_len,
            rows: 0,
        };
        writer.write_header()?;
        Ok(writer)
    }

    fn append(&mut self, bytes: &[u8], rows: u64) -> anyhow::Result<()> {
        self.file.write_all(bytes).with_context(|| format!("cannot write {}", self.path.display()))?;
        self.rows += rows;
        Ok(())
    }

    /// Flushes the rows, then states their number in the header: a reader never sees a header
    /// promising rows that are not there.
    fn commit(&mut self) -> anyhow::Result<()> {
        self.file.flush().with_context(|| format!("cannot write {}", self.path.display()))?;
        self.write_header()
    }

    fn write_header(&mut self) -> anyhow::Result<()> {
        let bytes = header(self.dtype, &self.sample_shape, self.rows, self.header_len);
        let file = self.file.get_mut();
        let written = file
            .seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(&bytes))
            .and_then(|()| file.seek(SeekFrom::End(0)).map(|_| ()));
        written.with_context(|| format!("cannot write the header of {}", self.path.display()))
    }
}

/// The `.npy` header for `rows` rows, padded with spaces to `len` bytes when `len` is larger.
fn header(dtype: DType, sample_shape: &[u64], rows: u64, len: usize) -> Vec<u8> {
    let shape: Vec<u64> = std::iter::once(rows).chain(sample_shape.iter().copied()).collect();
    conveyor_proto::npy_header_padded(dtype, &shape, len)
}

/// The dump's own files, named so that no field can take them (field names never start with
/// `__`).
pub(crate) const INDICES: &str = "__indices__";
/// See [`INDICES`].
pub(crate) const EPOCHS: &str = "__epochs__";

/// Open writers for the indices, the epochs and every field.
#[derive(Debug)]
pub(crate) struct Dump {
    indices: NpyWriter,
    epochs: NpyWriter,
    fields: Vec<NpyWriter>,
}

impl Dump {
    /// Creates the files in `dir` (new, or empty) for up to `max_rows` samples.
    ///
    /// # Errors
    /// A directory that already holds files, or the I/O error, naming the file.
    pub(crate) fn create(dir: &Path, info: &DatasetInfo, max_rows: u64) -> anyhow::Result<Dump> {
        if std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) {
            bail!("--dump directory {} already holds files; remove them or choose another directory", dir.display());
        }
        for field in &info.fields {
            conveyor_proto::check_field_name(&field.name)
                .map_err(|problem| anyhow::anyhow!("--dump: dataset '{}': {problem}", info.name))?;
            if field.ragged {
                bail!(
                    "--dump: dataset '{}' has the ragged field '{}' (samples of different lengths), which dumps do not \
                     write; stream without --dump, or read the samples through the library",
                    info.name,
                    field.name
                );
            }
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create --dump directory {}", dir.display()))?;
        let open = |name: &str, dtype, shape: &[u64]| {
            NpyWriter::create(dir.join(format!("{name}.npy")), dtype, shape, max_rows)
        };
        Ok(Dump {
            indices: open(INDICES, DType::Int64, &[])?,
            epochs: open(EPOCHS, DType::Int64, &[])?,
            fields: info
                .fields
                .iter()
                .map(|f| open(&f.name, DType::try_from(f.dtype).unwrap_or(DType::Unspecified), &f.sample_shape))
                .collect::<anyhow::Result<_>>()?,
        })
    }

    /// Appends a batch's rows and commits them.
    ///
    /// # Errors
    /// The I/O error.
    pub(crate) fn append(&mut self, batch: &Batch) -> anyhow::Result<()> {
        let rows = batch.indices.len() as u64;
        let indices: Vec<u8> = batch.indices.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect();
        let epochs: Vec<u8> =
            std::iter::repeat_n((batch.epoch as i64).to_le_bytes(), batch.indices.len()).flatten().collect();
        self.indices.append(&indices, rows)?;
        self.epochs.append(&epochs, rows)?;
        for (writer, field) in self.fields.iter_mut().zip(&batch.fields) {
            writer.append(&field.data, rows)?;
        }
        // __indices__.npy last: a reader trusts its row count (see the module docs).
        for writer in self.fields.iter_mut().chain([&mut self.epochs, &mut self.indices]) {
            writer.commit()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainer_client::FieldInfo;

    #[test]
    fn field_names_that_are_not_plain_file_names_are_refused_before_anything_is_written() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("dump");
        for bad in ["../escaped", "/tmp/abs", "__indices__", "__epochs__", "a/b", ".."] {
            let info = DatasetInfo {
                name: "d".into(),
                num_samples: 4,
                fields: vec![FieldInfo {
                    name: bad.into(),
                    dtype: DType::Int64 as i32,
                    sample_shape: vec![],
                    bytes_per_sample: 8,
                    ..FieldInfo::default()
                }],
                ..DatasetInfo::default()
            };
            let error = Dump::create(&dir, &info, 4).expect_err(bad).to_string();
            assert!(error.contains(&format!("{bad:?}")) && error.contains("--dump"), "{error}");
            assert!(!dir.exists() && !root.path().join("escaped.npy").exists(), "{bad}: nothing written");
        }
    }

    #[test]
    fn padded_headers_keep_their_length_and_numpy_layout() {
        let full = header(DType::Int16, &[12, 8, 8], 20_000_000_000, 0);
        let padded = header(DType::Int16, &[12, 8, 8], 3, full.len());
        assert_eq!(padded.len(), full.len());
        assert_eq!(padded.len() % 64, 0);
        assert_eq!(*padded.last().expect("non-empty"), b'\n');
        let dict_len = u16::from_le_bytes([padded[8], padded[9]]) as usize;
        assert_eq!(dict_len + 10, padded.len());
        assert!(String::from_utf8_lossy(&padded).contains("'shape': (3, 12, 8, 8)"));
    }
}
