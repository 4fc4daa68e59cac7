//! `--dump DIR`: received samples written as `.npy` files numpy reads, in delivery order.
//! The row count is known before streaming, so each file's header is written first and rows are
//! appended as batches arrive: memory stays at one batch whatever the run's length.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::Path,
};

use anyhow::Context;
use conveyor_proto::{DType, npy_header, v1::DatasetInfo};

use crate::batch::Batch;

/// Open `.npy` writers for the indices and every field.
#[derive(Debug)]
pub struct Dump {
    indices: BufWriter<File>,
    fields: Vec<BufWriter<File>>,
}

impl Dump {
    /// Creates `DIR/indices.npy` and `DIR/FIELD.npy` for `num_rows` samples.
    ///
    /// # Errors
    /// The I/O error, naming the file.
    pub fn create(dir: &Path, info: &DatasetInfo, num_rows: u64) -> anyhow::Result<Dump> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create --dump directory {}", dir.display()))?;
        let open = |name: &str, dtype: DType, sample_shape: &[u64]| -> anyhow::Result<BufWriter<File>> {
            let path = dir.join(format!("{name}.npy"));
            let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
            let mut writer = BufWriter::with_capacity(1 << 20, file);
            let shape: Vec<u64> = std::iter::once(num_rows).chain(sample_shape.iter().copied()).collect();
            writer.write_all(&npy_header(dtype, &shape)).with_context(|| format!("cannot write {}", path.display()))?;
            Ok(writer)
        };
        let indices = open("indices", DType::Int64, &[])?;
        let fields = info
            .fields
            .iter()
            .map(|f| open(&f.name, DType::try_from(f.dtype).unwrap_or(DType::Unspecified), &f.sample_shape))
            .collect::<anyhow::Result<_>>()?;
        Ok(Dump { indices, fields })
    }

    /// Appends a batch's rows.
    ///
    /// # Errors
    /// The I/O error.
    pub fn append(&mut self, batch: &Batch) -> anyhow::Result<()> {
        for index in &batch.indices {
            self.indices.write_all(&(*index as i64).to_le_bytes()).context("writing indices.npy")?;
        }
        for (writer, field) in self.fields.iter_mut().zip(&batch.fields) {
            writer.write_all(&field.data).with_context(|| format!("writing {}.npy", field.name))?;
        }
        Ok(())
    }

    /// Flushes every file.
    ///
    /// # Errors
    /// The I/O error.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.indices.flush().context("writing indices.npy")?;
        for writer in &mut self.fields {
            writer.flush().context("writing a --dump field file")?;
        }
        Ok(())
    }
}
