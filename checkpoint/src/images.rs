//! Private image directories.
//!
//! A CRIU image set holds a job's whole memory, open file names and credentials, so it must be readable by
//! us alone and must not outlive the migration that made it: a node that moves jobs all day would otherwise
//! fill its tmpfs (which is RAM) with stale dumps. [`ImageDir`] is one image set's directory: created with
//! mode 0700 whatever the umask, under a base directory we own, and removed when dropped, on success, on
//! error and on unwinding alike. [`ImageDir::keep`] disowns it on purpose, to look at a failed dump.
//!
//! [`prepare_store`] gives the image directories a tmpfs of their own, mounted with transparent huge pages
//! (`huge=within_size`): a gigabyte of images is written in a fraction of the time 4 KiB pages take, and
//! that time is part of how long a moving job stays frozen.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};

/// The mode of every directory this module creates: owner only.
const PRIVATE_MODE: u32 = 0o700;

/// How many unique names [`ImageDir::create`] tries before giving up; a clash needs another process with
/// our pid and the same nanosecond, so more than one retry means something is wrong.
const CREATE_ATTEMPTS: u32 = 16;

/// Distinguishes the image directories of one process; with the pid and the time it makes names unique.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// Where nodes keep image sets by default: a tmpfs of our own, see [`prepare_store`].
pub const DEFAULT_STORE: &str = "/run/rmosix/images";

/// The source name of the tmpfs migd mounts as its image store: how a job's start recognises image stores
/// to leave out of its mounts, and how migd recognises a store it mounted before.
pub const STORE_SOURCE: &str = "rmosix-images";

/// What [`prepare_store`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// A tmpfs of ours was mounted there now.
    Mounted,
    /// A tmpfs of ours was there already (an earlier migd's).
    Ours,
    /// It could not be mounted (no `CAP_SYS_ADMIN`, say): image sets go to the directory as it is.
    Plain,
}

/// Makes `path` the image store: a tmpfs of our own with transparent huge pages, even when `path` lies on
/// a tmpfs already (`/run` usually is one, without huge pages and shared with everything else). The store
/// is private (0700); parents it has to create are 0755, since they may also hold sockets every user must
/// reach (`/run/rmosix`). Image directories left in the store by a migd that died are removed. When it
/// cannot mount (no `CAP_SYS_ADMIN`), it logs why and uses the directory as it is.
///
/// Each migd needs a store of its own: the leftovers of another would be removed.
pub fn prepare_store(path: &Path) -> Result<Store, ImagesError> {
    let base = |source| ImagesError::Base { path: path.to_owned(), source };
    if let Some(parent) = path.parent() {
        DirBuilder::new().recursive(true).mode(0o755).create(parent).map_err(base)?;
    }
    match DirBuilder::new().mode(PRIVATE_MODE).create(path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(base(error)),
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(base)?;
    let store = if is_our_store(&mountinfo, path) {
        Store::Ours
    } else {
        match nix::mount::mount(
            Some(STORE_SOURCE),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOEXEC,
            Some("mode=0700,huge=within_size"),
        ) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "image store mounted (tmpfs, huge pages)");
                Store::Mounted
            }
            Err(error) => {
                tracing::warn!(
                    path = %path.display(),
                    %error,
                    "cannot mount a tmpfs for the image store; image sets go to the directory as it is, \
                     which is slower unless it is a tmpfs"
                );
                Store::Plain
            }
        }
    };
    fs::set_permissions(path, Permissions::from_mode(PRIVATE_MODE)).map_err(base)?;
    remove_leftovers(path).map_err(base)?;
    Ok(store)
}

/// Whether `path` is a mount point of an image store in `mountinfo` text.
fn is_our_store(mountinfo: &str, path: &Path) -> bool {
    rmosix_common::mountinfo::parse(mountinfo).iter().any(|m| is_store(m) && Path::new(&m.point) == path)
}

/// Whether a mount is an image store: a tmpfs named [`STORE_SOURCE`].
pub fn is_store(mount: &rmosix_common::mountinfo::Mount) -> bool {
    mount.fstype == "tmpfs" && mount.source == STORE_SOURCE
}

/// Removes the image directories a dead process left in `store`: those named `images-<pid>-...` whose
/// process is gone. Another live migd of this machine may share the store (the test cluster's nodes do),
/// so a directory of a live process stays.
fn remove_leftovers(store: &Path) -> io::Result<()> {
    for entry in fs::read_dir(store)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("images-").and_then(|rest| rest.split('-').next()?.parse::<i32>().ok()) else {
            continue;
        };
        let alive = pid == 0 || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if !alive && entry.file_type()?.is_dir() {
            tracing::info!(path = %entry.path().display(), "removing an image directory left by an earlier migd");
            fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(())
}


/// Why an image directory could not be created, opened or measured.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    /// The base directory could not be created or examined.
    #[error("cannot create or examine image base directory {path}")]
    Base {
        /// The base directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The base directory exists but is not a directory.
    #[error("image base {path} exists and is not a directory")]
    BaseNotDirectory {
        /// The base directory.
        path: PathBuf,
    },
    /// The base directory belongs to another user, who could swap our image directories for others.
    #[error("image base directory {path} is owned by uid {owner}, not by us (uid {us})")]
    BaseNotOurs {
        /// The base directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        us: u32,
    },
    /// The base directory is writable by others without the sticky bit, so they could rename our directories.
    #[error("image base directory {path} has mode {mode:o}: writable by others without the sticky bit")]
    BaseWritableByOthers {
        /// The base directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The image directory itself could not be created or made private.
    #[error("cannot create image directory {path}")]
    Create {
        /// The directory we tried to create.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The image directory could not be opened.
    #[error("cannot open image directory {path}")]
    Open {
        /// The image directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The image directory could not be listed, or one of its files examined.
    #[error("cannot read image directory {path}")]
    Read {
        /// The directory or file that failed.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The image directory could not be removed.
    #[error("cannot remove image directory {path}")]
    Remove {
        /// The image directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// A private directory holding one image set, removed with everything in it when dropped.
///
/// Dropping logs a warning if removal fails and never panics. Use [`ImageDir::remove`] to see the error
/// instead, or [`ImageDir::keep`] to leave the directory in place.
#[derive(Debug)]
pub struct ImageDir {
    /// The directory; `None` once removed or kept, so that drop leaves it alone.
    path: Option<PathBuf>,
}

impl ImageDir {
    /// Creates a new, empty image directory with mode 0700 under `base`.
    ///
    /// `base` (for example `/dev/shm/rmosix`) is created with mode 0700 if missing, its parents too. An
    /// existing `base` must be a directory owned by our effective uid and not writable by others unless it
    /// has the sticky bit (like `/dev/shm` itself): whoever can rename entries of `base` could swap our
    /// image directory for one of theirs. The new directory's mode is exactly 0700 whatever the umask.
    pub fn create(base: &Path) -> Result<ImageDir, ImagesError> {
        prepare_base(base)?;
        let pid = std::process::id();
        let mut last_error = None;
        for _ in 0..CREATE_ATTEMPTS {
            let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
            let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
            let path = base.join(format!("images-{pid}-{sequence}-{nanos:08x}"));
            // mkdir with 0700 can only come out stricter through the umask, never looser; fchmod then
            // makes it exactly 0700 through a descriptor, so no other directory can stand in for it.
            match DirBuilder::new().mode(PRIVATE_MODE).create(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
                    last_error = Some(error);
                    continue;
                }
                Err(source) => return Err(ImagesError::Create { path, source }),
            }
            // From here on the directory is ours: drop removes it if making it private fails.
            let dir = ImageDir { path: Some(path) };
            let path = dir.path();
            let file = open_directory(path).map_err(|source| ImagesError::Create { path: path.to_owned(), source })?;
            file.set_permissions(Permissions::from_mode(PRIVATE_MODE))
                .map_err(|source| ImagesError::Create { path: path.to_owned(), source })?;
            tracing::debug!(path = %path.display(), "image directory created");
            return Ok(dir);
        }
        Err(ImagesError::Create {
            path: base.to_owned(),
            source: last_error.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)),
        })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        self.path.as_deref().expect("an ImageDir holds its path until it is consumed")
    }

    /// Opens the directory (`O_DIRECTORY | O_CLOEXEC`), for `*at` calls or to hold it open.
    pub fn open_dir(&self) -> Result<OwnedFd, ImagesError> {
        let path = self.path();
        open_directory(path).map(OwnedFd::from).map_err(|source| ImagesError::Open { path: path.to_owned(), source })
    }

    /// Opens the directory *without* `O_CLOEXEC`, for CRIU's RPC `images_dir_fd`.
    ///
    /// `criu swrk` is a child process and opens the images through this descriptor number, so the
    /// descriptor must survive its `exec`. The price: every other child this process spawns while the
    /// descriptor is open inherits it too. Keep it open only around the CRIU request, and drop it right after.
    pub fn open_dir_inheritable(&self) -> Result<OwnedFd, ImagesError> {
        let fd = self.open_dir()?;
        fcntl(&fd, FcntlArg::F_SETFD(FdFlag::empty()))
            .map_err(|errno| ImagesError::Open { path: self.path().to_owned(), source: io::Error::from(errno) })?;
        Ok(fd)
    }

    /// The sum of the sizes of the regular files in the directory, in bytes: what a transfer will move.
    ///
    /// Only the top level counts: CRIU writes no subdirectories.
    pub fn total_size(&self) -> Result<u64, ImagesError> {
        let path = self.path();
        let read_error = |path: &Path| {
            let path = path.to_owned();
            move |source| ImagesError::Read { path, source }
        };
        let mut bytes = 0;
        for entry in fs::read_dir(path).map_err(read_error(path))? {
            let entry = entry.map_err(read_error(path))?;
            let metadata = entry.metadata().map_err(read_error(&entry.path()))?;
            if metadata.is_file() {
                bytes += metadata.len();
            }
        }
        Ok(bytes)
    }

    /// Removes the directory and everything in it now, reporting failure instead of logging it.
    pub fn remove(mut self) -> Result<(), ImagesError> {
        match self.path.take() {
            Some(path) => remove_tree(&path).map_err(|source| ImagesError::Remove { path, source }),
            None => Ok(()),
        }
    }

    /// Disowns the directory: it stays on disk and its path is returned, for example to read CRIU's log
    /// or images after a failure. Whoever calls this is responsible for removing it.
    pub fn keep(mut self) -> PathBuf {
        let path = self.path.take().expect("an ImageDir holds its path until it is consumed");
        tracing::info!(path = %path.display(), "image directory kept");
        path
    }
}

impl Drop for ImageDir {
    fn drop(&mut self) {
        if let Some(path) = self.path.take()
            && let Err(error) = remove_tree(&path)
        {
            tracing::warn!(path = %path.display(), %error, "cannot remove image directory");
        }
    }
}

/// Removes a directory tree; one already gone counts as removed.
fn remove_tree(path: &Path) -> io::Result<()> {
    // remove_dir_all does not follow symbolic links, so a link planted inside can't make us delete elsewhere.
    match fs::remove_dir_all(path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        result => result,
    }
}

/// Opens a directory, not following a symbolic link in its last component.
fn open_directory(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW).open(path)
}

/// Creates `base` (mode 0700) if missing, and checks that an existing one is a directory only we can rename
/// entries of.
fn prepare_base(base: &Path) -> Result<(), ImagesError> {
    let base_error = |source| ImagesError::Base { path: base.to_owned(), source };
    match DirBuilder::new().mode(PRIVATE_MODE).create(base) {
        Ok(()) => {
            // Made by us: exactly 0700, whatever the umask.
            fs::set_permissions(base, Permissions::from_mode(PRIVATE_MODE)).map_err(base_error)?;
            return Ok(());
        }
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            DirBuilder::new().recursive(true).mode(PRIVATE_MODE).create(base).map_err(base_error)?;
            fs::set_permissions(base, Permissions::from_mode(PRIVATE_MODE)).map_err(base_error)?;
            return Ok(());
        }
        Err(error) => return Err(base_error(error)),
    }
    let metadata = fs::metadata(base).map_err(base_error)?;
    if !metadata.is_dir() {
        return Err(ImagesError::BaseNotDirectory { path: base.to_owned() });
    }
    let us = nix::unistd::geteuid().as_raw();
    // In a sticky directory (like /dev/shm) only an entry's owner can rename or remove it, so then the
    // base's owner and mode don't matter.
    let sticky = metadata.mode() & 0o1000 != 0;
    if metadata.uid() != us && !sticky {
        return Err(ImagesError::BaseNotOurs { path: base.to_owned(), owner: metadata.uid(), us });
    }
    if metadata.mode() & 0o022 != 0 && !sticky {
        return Err(ImagesError::BaseWritableByOthers { path: base.to_owned(), mode: metadata.mode() & 0o7777 });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn creates_private_directory_and_base() {
        let scratch = tempfile::tempdir().unwrap();
        let base = scratch.path().join("a/b/rmosix");
        let dir = ImageDir::create(&base).unwrap();
        assert_eq!(mode_of(&base), 0o700);
        assert_eq!(mode_of(dir.path()), 0o700);
        assert!(dir.path().starts_with(&base));
        assert_eq!(dir.total_size().unwrap(), 0);
    }

    /// The umask belongs to the whole process and tests run in parallel threads, so the test runs itself
    /// again in a child process to change it.
    #[test]
    fn mode_is_exact_whatever_the_umask() {
        const CHILD: &str = "RMOSIX_TEST_UMASK_BASE";
        if let Some(base) = std::env::var_os(CHILD) {
            // 0o277 would make a plain mkdir(0o700) give 0o500.
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o277));
            let base = PathBuf::from(base);
            let dir = ImageDir::create(&base).unwrap();
            assert_eq!(mode_of(dir.path()), 0o700);
            assert_eq!(mode_of(&base), 0o700);
            return;
        }
        let scratch = tempfile::tempdir().unwrap();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "images::tests::mode_is_exact_whatever_the_umask", "--test-threads=1"])
            .env(CHILD, scratch.path().join("base"))
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "the child test failed: {status}");
        // The child ran and created the base: the test did not pass vacuously.
        assert_eq!(mode_of(&scratch.path().join("base")), 0o700);
    }

    #[test]
    fn names_are_unique() {
        let scratch = tempfile::tempdir().unwrap();
        let dirs: Vec<_> = (0..50).map(|_| ImageDir::create(scratch.path()).unwrap()).collect();
        let mut paths: Vec<_> = dirs.iter().map(|d| d.path().to_owned()).collect();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), 50);
    }

    #[test]
    fn drop_removes_everything() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = ImageDir::create(scratch.path()).unwrap();
        let path = dir.path().to_owned();
        fs::write(path.join("pages-1.img"), vec![7u8; 10_000]).unwrap();
        fs::write(path.join("core-1.img"), b"core").unwrap();
        fs::create_dir(path.join("sub")).unwrap();
        fs::write(path.join("sub/x"), b"x").unwrap();
        assert_eq!(dir.total_size().unwrap(), 10_004);
        drop(dir);
        assert!(!path.exists());
        assert!(scratch.path().exists());
    }

    /// A directory someone else removed counts as removed: no error from `remove`, and so no warning from
    /// `drop`, which removes the same way.
    #[test]
    fn drop_after_external_removal_is_quiet() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = ImageDir::create(scratch.path()).unwrap();
        fs::remove_dir(dir.path()).unwrap();
        dir.remove().unwrap();
        let dir = ImageDir::create(scratch.path()).unwrap();
        let path = dir.path().to_owned();
        fs::remove_dir(&path).unwrap();
        remove_tree(&path).unwrap();
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn remove_reports_and_keep_disowns() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = ImageDir::create(scratch.path()).unwrap();
        let path = dir.path().to_owned();
        dir.remove().unwrap();
        assert!(!path.exists());

        let dir = ImageDir::create(scratch.path()).unwrap();
        fs::write(dir.path().join("criu.log"), b"log").unwrap();
        let kept = dir.keep();
        assert!(kept.join("criu.log").exists());
        fs::remove_dir_all(kept).unwrap();
    }

    #[test]
    fn descriptors_differ_in_close_on_exec_only() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = ImageDir::create(scratch.path()).unwrap();
        let flags = |fd: &OwnedFd| FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD).unwrap());
        let private = dir.open_dir().unwrap();
        let inheritable = dir.open_dir_inheritable().unwrap();
        assert!(flags(&private).contains(FdFlag::FD_CLOEXEC));
        assert!(!flags(&inheritable).contains(FdFlag::FD_CLOEXEC));
        // Both name the image directory.
        for fd in [&private, &inheritable] {
            let link = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
            assert_eq!(link, fs::canonicalize(dir.path()).unwrap());
        }
    }

    #[test]
    fn refuses_a_base_that_is_a_file() {
        let scratch = tempfile::tempdir().unwrap();
        let base = scratch.path().join("file");
        fs::write(&base, b"").unwrap();
        let error = ImageDir::create(&base).unwrap_err();
        assert!(matches!(error, ImagesError::BaseNotDirectory { .. }), "{error}");
        assert!(error.to_string().contains("file"));
    }

    #[test]
    fn refuses_a_base_owned_by_another_user() {
        assert!(nix::unistd::geteuid().is_root(), "making a directory owned by another user needs root (run the tests as root)");
        let scratch = tempfile::tempdir().unwrap();
        let base = scratch.path().join("theirs");
        fs::create_dir(&base).unwrap();
        fs::set_permissions(&base, Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&base, Some(65534), Some(65534)).unwrap();
        let error = ImageDir::create(&base).unwrap_err();
        assert!(matches!(error, ImagesError::BaseNotOurs { owner: 65534, us: 0, .. }), "{error}");
    }

    #[test]
    fn refuses_a_base_writable_by_others() {
        let scratch = tempfile::tempdir().unwrap();
        let base = scratch.path().join("open");
        fs::create_dir(&base).unwrap();
        fs::set_permissions(&base, Permissions::from_mode(0o777)).unwrap();
        let error = ImageDir::create(&base).unwrap_err();
        assert!(matches!(error, ImagesError::BaseWritableByOthers { mode: 0o777, .. }), "{error}");
        // With the sticky bit, like /dev/shm, it is fine.
        fs::set_permissions(&base, Permissions::from_mode(0o1777)).unwrap();
        let dir = ImageDir::create(&base).unwrap();
        assert_eq!(mode_of(dir.path()), 0o700);
    }

    #[test]
    fn the_store_is_a_tmpfs_of_its_own_even_on_a_tmpfs_and_leftovers_go() {
        assert!(nix::unistd::geteuid().is_root(), "mounting the store needs root (run the tests as root)");
        // /dev/shm is a tmpfs: the store still gets its own mount, with huge pages.
        let scratch = tempfile::tempdir_in("/dev/shm").unwrap();
        let store = scratch.path().join("parent/store");
        assert_eq!(prepare_store(&store).unwrap(), Store::Mounted);
        let unmount = || nix::mount::umount2(&store, nix::mount::MntFlags::MNT_DETACH);
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = mountinfo.lines().find(|l| l.split_whitespace().nth(4) == Some(store.to_str().unwrap()));
        let line = line.unwrap_or_else(|| { let _ = unmount(); panic!("{} is not a mount point", store.display()) });
        assert!(line.contains(&format!(" - tmpfs {STORE_SOURCE} ")) && line.contains("huge=within_size"), "{line}");
        assert_eq!(mode_of(&store), 0o700);
        // Parents it made are open to everyone (sockets may live there).
        assert_eq!(mode_of(&scratch.path().join("parent")), 0o755);
        // A migd that died left an image directory; the next one finds its store and cleans it. One of a live
        // process (this one) stays.
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = dead.id();
        dead.wait().unwrap();
        let left = store.join(format!("images-{dead_pid}-0-00000000"));
        fs::create_dir(&left).unwrap();
        fs::write(left.join("pages-1.img"), b"x").unwrap();
        let in_use = ImageDir::create(&store).unwrap();
        let unrelated = store.join("notes");
        fs::write(&unrelated, b"kept").unwrap();
        assert_eq!(prepare_store(&store).unwrap(), Store::Ours);
        assert!(!left.exists(), "leftover image directory removed");
        assert!(in_use.path().exists(), "a live process's image directory stays");
        drop(in_use);
        assert!(unrelated.exists(), "only image directories are removed");
        unmount().unwrap();
    }
}
