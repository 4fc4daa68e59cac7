//! `.npz` archives: the members of a zip written by `np.savez` are `.npy` files stored without
//! compression, each contiguous in the archive, so a member is served from a memory map of the
//! whole archive at its data offset exactly like a `.npy` file. The zip's central directory
//! (zip64 included, which numpy always writes) is read with the `zip` crate; nothing is inflated.

use std::{
    fs::File,
    io::BufReader,
    path::{Path, PathBuf},
    sync::Arc,
};

use zip::{CompressionMethod, ZipArchive};

use super::{
    Field, group_fields,
    npy::{ShardBytes, open_field},
    select_fields,
};
use crate::{
    error::{LoadError, NpzProblem},
    storage::mmap::MappedFile,
};

/// One `.npy` member of an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The member's name inside the archive (`board.npy`).
    pub file_name: String,
    /// Offset of its first byte (the `.npy` magic) in the archive file.
    pub data_start: u64,
    /// Its length in bytes.
    pub size: u64,
}

/// Whether `path` is an `.npz` file.
pub fn is_npz(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npz")) && path.is_file()
}

/// How a member is named in messages: `ARCHIVE.npz (member NAME)`.
pub fn member_path(archive: &Path, member: &str) -> PathBuf {
    PathBuf::from(format!("{} (member {member})", archive.display()))
}

/// The `.npy` members of the archive at `path`, in archive order.
///
/// # Errors
/// [`LoadError::Npz`] for a file that is not a zip archive, and for a compressed or encrypted
/// member (naming it and the fix); [`LoadError::Io`] when the file cannot be read.
pub fn members(path: &Path) -> Result<Vec<Member>, LoadError> {
    let file = File::open(path).map_err(|error| LoadError::Io { path: path.to_owned(), error })?;
    let mut archive = ZipArchive::new(BufReader::new(file))
        .map_err(|e| LoadError::Npz { path: path.to_owned(), problem: NpzProblem::NotZip(e) })?;
    let mut members = Vec::with_capacity(archive.len());
    for index in 0..archive.len() {
        let entry = archive.by_index_raw(index).map_err(|e| LoadError::Npz {
            path: path.to_owned(),
            problem: NpzProblem::DamagedEntry { index, error: e },
        })?;
        let name = entry.name().map(|n| n.into_owned()).unwrap_or_else(|_| format!("entry {index}"));
        if entry.is_dir() {
            continue;
        }
        if !name.ends_with(".npy") {
            tracing::warn!(archive = %path.display(), member = %name, "skipping a member that is not a .npy file");
            continue;
        }
        let at_fault = |problem: NpzProblem| LoadError::Npz { path: member_path(path, &name), problem };
        if entry.encrypted() {
            return Err(at_fault(NpzProblem::Encrypted));
        }
        let compression = entry.compression();
        if compression != CompressionMethod::Stored {
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let compression = compression.to_string();
            return Err(at_fault(NpzProblem::Compressed { compression, archive: path.to_owned(), stem }));
        }
        let data_start = entry.data_start().ok_or_else(|| at_fault(NpzProblem::NoLocalHeader))?;
        members.push(Member { file_name: name, data_start, size: entry.size() });
    }
    // Members share no bytes: a crafted directory whose entries overlap would serve the same
    // bytes as two fields (or one member's bytes as another's header).
    let mut by_start: Vec<&Member> = members.iter().collect();
    by_start.sort_by_key(|m| m.data_start);
    for pair in by_start.windows(2) {
        if pair[0].data_start.saturating_add(pair[0].size) > pair[1].data_start {
            let (first, second) = (pair[0].file_name.clone(), pair[1].file_name.clone());
            return Err(LoadError::Npz { path: path.to_owned(), problem: NpzProblem::Overlap { first, second } });
        }
    }
    Ok(members)
}

/// Opens the `.npy` members of the archive at `path` as fields (those in `select` when given),
/// all served from one map of the archive.
pub(super) fn open_npz(name: &str, path: &Path, select: Option<&[String]>) -> Result<Vec<Field>, LoadError> {
    let members = members(path)?;
    let map = Arc::new(MappedFile::open(path).map_err(|error| LoadError::Io { path: path.to_owned(), error })?);
    let stems =
        members.into_iter().map(|m| (m.file_name.strip_suffix(".npy").unwrap_or(&m.file_name).to_owned(), m)).collect();
    let groups = group_fields(stems, path)?;
    if groups.is_empty() {
        return Err(LoadError::Npz {
            path: path.to_owned(),
            problem: NpzProblem::NoMembers { dataset: name.to_owned() },
        });
    }
    let mut fields = Vec::with_capacity(groups.len());
    for (field_name, members) in select_fields(name, path, groups, select)? {
        let mut shards = Vec::with_capacity(members.len());
        for member in members {
            let member_path = member_path(path, &member.file_name);
            let end = member.data_start.checked_add(member.size).filter(|&end| end <= map.len() as u64);
            let Some(end) = end else {
                return Err(LoadError::Truncated {
                    path: member_path,
                    expected_bytes: member.size,
                    actual_bytes: (map.len() as u64).saturating_sub(member.data_start),
                });
            };
            let start = member.data_start as usize;
            shards.push(ShardBytes::mapped(member_path, map.clone(), start, end as usize - start));
        }
        fields.push(open_field(&field_name, shards)?);
    }
    Ok(fields)
}
