//! Image folders as torchvision's `ImageFolder` reads them: `ROOT/CLASS/.../FILE.jpg`, classes in
//! sorted name order (their index is the label), files in sorted order within each class's tree
//! (symbolic links followed), only image extensions counted. Served as two fields: `image`, each
//! file's bytes (ragged `uint8`, not decoded), and `label`, the class index (`int64`).
//!
//! The listing is taken once at start-up, with each file's size; a batch reads its files whole
//! (a few hundred KB each, so reads rather than maps) and refuses a file whose size changed
//! since, naming it: the bytes served are the bytes listed.

use std::{
    io::Read,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
};

use bytes::Bytes;
use conveyor_proto::{
    DType,
    wire::{OutgoingTensor, Piece},
};

use super::{Field, NEXT_FIELD_ID, Source, ragged::OffsetsWriter};
use crate::error::LoadError;

/// The extensions torchvision's `ImageFolder` takes (compared without case).
const IMAGE_EXTENSIONS: [&str; 9] = ["jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp"];

/// The files of an image folder, in sample order, with the sizes listed at start-up.
#[derive(Debug)]
pub(super) struct Files {
    /// Each sample's file.
    paths: Vec<PathBuf>,
    /// Its size when listed.
    sizes: Vec<u64>,
}

impl Files {
    /// Appends the files of `indices` to `tensor` (read whole, in one buffer) with their offsets.
    ///
    /// # Errors
    /// The sample whose file cannot be read or changed size since start-up, and why.
    pub(super) fn select_into(&self, indices: &[u64], tensor: &mut OutgoingTensor) -> Result<u64, (u64, String)> {
        let total: u64 = indices.iter().map(|&i| self.sizes[i as usize]).sum();
        let mut data = Vec::with_capacity(total as usize);
        let mut offsets = OffsetsWriter::new(indices.len());
        for &index in indices {
            let (path, size) = (&self.paths[index as usize], self.sizes[index as usize]);
            let start = data.len();
            let read = std::fs::File::open(path).and_then(|file| file.take(size + 1).read_to_end(&mut data));
            match read {
                Ok(n) if n as u64 == size => {}
                Ok(n) => {
                    return Err((
                        index,
                        format!(
                            "{} holds {n}{} bytes but held {size} when the loader started; files of an image \
                             folder must not change while it is served (restart the loader after changing them)",
                            path.display(),
                            if n as u64 > size { " or more" } else { "" }
                        ),
                    ));
                }
                Err(error) => return Err((index, format!("cannot read {}: {error}", path.display()))),
            }
            offsets.push((data.len() - start) as u64);
        }
        let read = data.len() as u64;
        let piece = tensor.add_piece(Piece { bytes: Bytes::from(data), big_endian: false });
        tensor.push(piece, 0, read as usize);
        offsets.finish(tensor);
        Ok(read)
    }

    /// The file of sample `index`, for messages.
    pub(super) fn describe(&self, index: u64) -> String {
        self.paths[index as usize].display().to_string()
    }

    /// Bytes a batch of `indices` sends: the files' listed sizes and the offsets.
    pub(super) fn batch_bytes(&self, indices: &[u64]) -> u64 {
        indices.iter().map(|&i| self.sizes[i as usize]).sum::<u64>() + (indices.len() as u64 + 1) * 8
    }
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Whether `dir` is an image folder: no `.npy` files of its own, and a subdirectory holding an
/// image somewhere below it.
pub(super) fn is_image_folder(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    let entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    !entries.iter().any(|p| p.extension().is_some_and(|e| e == "npy"))
        && entries.iter().filter(|p| p.is_dir()).any(|class| walk(class).is_ok_and(|files| !files.is_empty()))
}

/// The image files below `dir`, in torchvision's order: the tree walked with sorted
/// directories, each directory's files sorted by name.
fn walk(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    entries.sort();
    let mut files: Vec<PathBuf> = entries.iter().filter(|p| p.is_file() && is_image(p)).cloned().collect();
    for sub in entries.iter().filter(|p| p.is_dir()) {
        files.extend(walk(sub)?);
    }
    Ok(files)
}

/// Opens the image folder at `dir` as the fields `image` and `label` (those in `select`).
///
/// # Errors
/// [`LoadError::Io`] for a directory or file that cannot be listed, [`LoadError::NoFields`]
/// when no class holds an image.
pub(super) fn open(name: &str, dir: &Path, select: Option<&[String]>) -> Result<Vec<Field>, LoadError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |error| LoadError::Io { path, error }
    };
    let mut classes: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    let (mut paths, mut sizes, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for (label, class) in classes.iter().enumerate() {
        for path in walk(class).map_err(io(class))? {
            sizes.push(std::fs::metadata(&path).map_err(io(&path))?.len());
            paths.push(path);
            labels.push(label as i64);
        }
    }
    if paths.is_empty() {
        return Err(LoadError::NoFields { dataset: name.to_owned(), dir: dir.to_owned() });
    }
    let num_samples = paths.len() as u64;
    let keep = |field: &str| select.is_none_or(|s| s.iter().any(|f| f == field));
    if let Some(unknown) = select.and_then(|s| s.iter().find(|f| *f != "image" && *f != "label")) {
        return Err(LoadError::UnknownField {
            dataset: name.to_owned(),
            field: unknown.clone(),
            location: dir.to_owned(),
            available: "image, label".into(),
        });
    }
    let mut fields = Vec::new();
    if keep("image") {
        fields.push(Field {
            name: "image".into(),
            dtype: DType::Uint8,
            sample_shape: Vec::new(),
            bytes_per_sample: 0,
            chunk_len: 1,
            dims: Vec::new(),
            num_samples,
            id: NEXT_FIELD_ID.fetch_add(1, Ordering::Relaxed),
            source: Source::Files(Box::new(Files { paths, sizes })),
        });
    }
    if keep("label") {
        let bytes: Vec<u8> = labels.iter().flat_map(|l| l.to_le_bytes()).collect();
        fields.push(Field {
            name: "label".into(),
            dtype: DType::Int64,
            sample_shape: Vec::new(),
            bytes_per_sample: 8,
            chunk_len: 1,
            dims: Vec::new(),
            num_samples,
            id: NEXT_FIELD_ID.fetch_add(1, Ordering::Relaxed),
            source: Source::Memory(Bytes::from(bytes)),
        });
    }
    Ok(fields)
}
