//! A newc ("070701") cpio writer for the guest initramfs. Written here rather than driving the
//! `cpio` tool so the archive can hold device nodes and root-owned files without touching the
//! host filesystem, and so its contents are fully determined by the inputs.
use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

#[derive(Debug, Clone)]
enum Entry {
    Dir,
    File { source: Source, mode: u32 },
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

#[derive(Debug, Clone)]
enum Source {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

/// An in-memory listing; parents are added automatically and entries are written sorted, so
/// every directory precedes its contents as the kernel's unpacker requires.
#[derive(Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    pub fn dir(&mut self, path: &str) {
        self.insert(path, Entry::Dir);
    }

    /// A regular file whose content is read from `source` (following symlinks) at write time.
    pub fn file(&mut self, path: &str, source: &Path, mode: u32) {
        self.insert(
            path,
            Entry::File {
                source: Source::Path(source.to_path_buf()),
                mode,
            },
        );
    }

    pub fn bytes(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) {
        self.insert(
            path,
            Entry::File {
                source: Source::Bytes(data.into()),
                mode,
            },
        );
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.insert(path, Entry::Symlink(target.to_string()));
    }

    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.insert(path, Entry::CharDev { major, minor });
    }

    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(normalize(path))
    }

    fn insert(&mut self, path: &str, entry: Entry) {
        let path = normalize(path);
        let mut parent = Path::new(path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            self.entries
                .entry(p.to_string_lossy().into_owned())
                .or_insert(Entry::Dir);
            parent = p.parent();
        }
        self.entries.insert(path.to_string(), entry);
    }

    /// Writes the archive (owned by root, mtime 0) followed by the trailer.
    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        for (ino, (name, entry)) in (1..).zip(&self.entries) {
            let (mode, data, rdev): (u32, Vec<u8>, (u32, u32)) = match entry {
                Entry::Dir => (S_IFDIR | 0o755, Vec::new(), (0, 0)),
                Entry::File {
                    source: Source::Path(p),
                    mode,
                } => (S_IFREG | mode, fs::read(p)?, (0, 0)),
                Entry::File {
                    source: Source::Bytes(b),
                    mode,
                } => (S_IFREG | mode, b.clone(), (0, 0)),
                Entry::Symlink(target) => (S_IFLNK | 0o777, target.as_bytes().to_vec(), (0, 0)),
                Entry::CharDev { major, minor } => (S_IFCHR | 0o600, Vec::new(), (*major, *minor)),
            };
            let nlink = if matches!(entry, Entry::Dir) { 2 } else { 1 };
            write_header(out, ino, mode, nlink, data.len(), rdev, name)?;
            out.write_all(&data)?;
            pad(out, data.len())?;
        }
        write_header(out, 0, 0, 1, 0, (0, 0), "TRAILER!!!")
    }
}

fn normalize(path: &str) -> &str {
    path.trim_start_matches('/').trim_end_matches('/')
}

fn write_header(
    out: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: usize,
    rdev: (u32, u32),
    name: &str,
) -> io::Result<()> {
    let size =
        u32::try_from(size).map_err(|_| io::Error::other(format!("{name}: too large for newc")))?;
    let namesize = name.len() + 1;
    // Fields: ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check.
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
        0, 0, 0, 0, 0, rdev.0, rdev.1, 0
    );
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    // The header (110 bytes) plus the name is padded to a multiple of 4.
    pad(out, 110 + namesize)
}

fn pad(out: &mut impl Write, len: usize) -> io::Result<()> {
    out.write_all(&[0; 3][..(4 - len % 4) % 4])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// The real `cpio` tool must list exactly what we wrote, in order, with the right types.
    #[test]
    fn gnu_cpio_reads_the_archive() {
        let mut a = Archive::default();
        a.bytes("/init", "#!/bin/sh\n", 0o755);
        a.symlink("/bin/sh", "busybox");
        a.bytes("/bin/busybox", vec![7u8; 5], 0o755);
        a.char_dev("/dev/console", 5, 1);
        let mut buf = Vec::new();
        a.write_to(&mut buf).unwrap();
        assert_eq!(buf.len() % 4, 0);
        let mut child = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cpio is installed by bootstrap");
        child.stdin.take().unwrap().write_all(&buf).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = listing.lines().collect();
        let names: Vec<&str> = lines
            .iter()
            .map(|l| l.split_whitespace().last().unwrap())
            .collect();
        assert_eq!(
            names,
            // The symlink's line ends in "bin/sh -> busybox".
            [
                "bin",
                "bin/busybox",
                "busybox",
                "dev",
                "dev/console",
                "init"
            ],
            "{listing}"
        );
        assert!(lines[0].starts_with('d'));
        assert!(
            lines[2].starts_with('l') && lines[2].contains("bin/sh -> busybox"),
            "{listing}"
        );
        assert!(
            lines[4].starts_with('c') && lines[4].contains("5,"),
            "{listing}"
        );
        assert!(lines[5].starts_with("-rwxr-xr-x"));
    }
}
