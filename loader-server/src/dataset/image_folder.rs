//! Image folders as torchvision's `ImageFolder` reads them: `ROOT/CLASS/.../FILE.jpg`, classes in
//! sorted name order (their index is the label), files in sorted order within each class's tree
//! (symbolic links followed), only image extensions counted. Served as two fields: `image`, each
//! file's bytes (ragged `uint8`, not decoded), and `label`, the class index (`int64`).
//!
//! The listing is taken once at start-up, with each file's size; a batch reads its files whole
//! (a few hundred KB each, so reads rather than maps) and refuses a file whose size changed
//! since, naming it: the bytes served are the bytes listed. In object storage (`s3://`,
//! `https://` with WebDAV listings) the same layout is read from one recursive listing, each
//! object pinned at its listed version, `--io-concurrency` objects read at once per batch
//! (through the disk cache when one is set).

use std::{
    io::Read,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
};

use bytes::Bytes;
use conveyor_proto::{
    DType,
    wire::{OutgoingTensor, Piece},
};

use super::{Field, NEXT_FIELD_ID, Source, ragged::OffsetsWriter};
use crate::{
    error::LoadError,
    storage::object::{ObjectStorage, ObjectVersion},
};

/// The extensions torchvision's `ImageFolder` takes (compared without case).
const IMAGE_EXTENSIONS: [&str; 9] = ["jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp"];

/// The files of an image folder, in sample order, with the sizes listed at start-up.
#[derive(Debug)]
pub(super) struct Files {
    /// Where each sample's file is.
    place: Place,
    /// Its size when listed.
    sizes: Vec<u64>,
}

/// Where an image folder's files are.
#[derive(Debug)]
enum Place {
    /// Local files, by path.
    Local(Vec<PathBuf>),
    /// Objects under a store's prefix: (name, version listed).
    Remote { storage: Arc<ObjectStorage>, objects: Vec<(String, ObjectVersion)> },
}

impl Files {
    /// Appends the files of `indices` to `tensor` with their offsets: local files read whole
    /// into one buffer, objects each as one piece. Returns the bytes read.
    ///
    /// # Errors
    /// The sample whose file cannot be read or changed since start-up, and why.
    pub(super) fn select_into(&self, indices: &[u64], tensor: &mut OutgoingTensor) -> Result<u64, (u64, String)> {
        let Place::Remote { storage, objects } = &self.place else { return self.select_local(indices, tensor) };
        let wanted: Vec<(&str, u64, &ObjectVersion)> = indices
            .iter()
            .map(|&i| (objects[i as usize].0.as_str(), self.sizes[i as usize], &objects[i as usize].1))
            .collect();
        let mut offsets = OffsetsWriter::new(indices.len());
        let mut read = 0;
        for ((&index, &(_, size, _)), bytes) in indices.iter().zip(&wanted).zip(storage.read_objects(&wanted)) {
            let bytes = bytes.map_err(|reason| (index, reason))?;
            if bytes.len() as u64 != size {
                return Err((
                    index,
                    format!("{} returned {} bytes but was listed with {size}", self.describe(index), bytes.len()),
                ));
            }
            read += size;
            let piece = tensor.add_piece(Piece { bytes, big_endian: false });
            tensor.push(piece, 0, size as usize);
            offsets.push(size);
        }
        offsets.finish(tensor);
        Ok(read)
    }

    /// [`Files::select_into`] for local files.
    fn select_local(&self, indices: &[u64], tensor: &mut OutgoingTensor) -> Result<u64, (u64, String)> {
        let Place::Local(paths) = &self.place else { unreachable!("called for local folders only") };
        let total: u64 = indices.iter().map(|&i| self.sizes[i as usize]).sum();
        let mut data = Vec::with_capacity(total as usize);
        let mut offsets = OffsetsWriter::new(indices.len());
        for &index in indices {
            let (path, size) = (&paths[index as usize], self.sizes[index as usize]);
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
        match &self.place {
            Place::Local(paths) => paths[index as usize].display().to_string(),
            Place::Remote { storage, objects } => format!("{}/{}", storage.url(), objects[index as usize].0),
        }
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
    fields(name, dir, Files { place: Place::Local(paths), sizes }, labels, select)
}

/// Whether a recursive listing of a store's prefix is an image folder: no `.npy` or `.tar`
/// objects at its top, and an image object inside a class prefix.
pub(super) fn is_image_listing(objects: &[(String, u64, ObjectVersion)]) -> bool {
    let top = |name: &str, ext: &str| !name.contains('/') && name.ends_with(ext);
    !objects.iter().any(|(name, ..)| top(name, ".npy") || top(name, ".tar"))
        && objects.iter().any(|(name, ..)| name.contains('/') && is_image(Path::new(name)))
}

/// Opens the image folder under `storage`'s prefix from its recursive listing `objects`, in
/// the order [`open`] gives a local one: classes by name, then within each class the files of
/// a directory (by name) before its subdirectories (by name).
///
/// # Errors
/// As [`open`].
pub(super) fn open_remote(
    name: &str,
    storage: &Arc<ObjectStorage>,
    objects: Vec<(String, u64, ObjectVersion)>,
    select: Option<&[String]>,
) -> Result<Vec<Field>, LoadError> {
    // Sort key: each directory component after the files beside it.
    let key = |object: &str| -> Vec<(bool, String)> {
        let parts: Vec<&str> = object.split('/').collect();
        let last = parts.len() - 1;
        parts.iter().enumerate().map(|(i, part)| (i < last, (*part).to_owned())).collect()
    };
    let mut images: Vec<(Vec<(bool, String)>, String, u64, ObjectVersion)> = objects
        .into_iter()
        .filter(|(object, ..)| object.contains('/') && is_image(Path::new(object)))
        .map(|(object, size, version)| (key(&object), object, size, version))
        .collect();
    images.sort_by(|a, b| a.0.cmp(&b.0));
    let (mut listed, mut sizes, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    let mut classes: Vec<String> = Vec::new();
    for (_, object, size, version) in images {
        let class = object.split('/').next().unwrap_or_default().to_owned();
        if classes.last() != Some(&class) {
            classes.push(class);
        }
        labels.push(classes.len() as i64 - 1);
        sizes.push(size);
        listed.push((object, version));
    }
    let place = Place::Remote { storage: storage.clone(), objects: listed };
    fields(name, Path::new(storage.url()), Files { place, sizes }, labels, select)
}

/// The fields `image` (the files) and `label` (`labels`) of an image folder at `dir`, those in
/// `select`.
fn fields(
    name: &str,
    dir: &Path,
    files: Files,
    labels: Vec<i64>,
    select: Option<&[String]>,
) -> Result<Vec<Field>, LoadError> {
    if files.sizes.is_empty() {
        return Err(LoadError::NoFields { dataset: name.to_owned(), dir: dir.to_owned() });
    }
    let num_samples = files.sizes.len() as u64;
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
            source: Source::Files(Box::new(files)),
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
