//! Byte relays between a job's pipes and the deputy's stdio.
//!
//! Threads and blocking I/O: a relay moves a stream until its source ends, in order and without loss. The
//! deputy's descriptors may be a terminal, a file or a pipe shared with its shell, so they are never switched
//! to non-blocking mode (that would change them for everyone holding them); a relay that must be able to stop
//! early polls its source with a timeout instead.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// Where relayed bytes go.
pub trait Sink: Send {
    /// Writes all of `data`; an error ends the relay.
    fn put(&mut self, data: &[u8]) -> std::io::Result<()>;
    /// The source ended.
    fn end(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink for File {
    fn put(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.write_all(data)
    }
}

/// Copies `source` into `sink` on a thread until `source` ends (EOF or error); returns the bytes moved.
pub fn spawn(name: &str, source: OwnedFd, sink: impl Sink + 'static) -> JoinHandle<u64> {
    start(name, source, sink, None)
}

/// Copies `source` into `sink` until `source` ends or `stop` is set (checked every 200 ms while idle).
pub fn spawn_stoppable(
    name: &str,
    source: OwnedFd,
    sink: impl Sink + 'static,
    stop: Arc<AtomicBool>,
) -> JoinHandle<u64> {
    start(name, source, sink, Some(stop))
}

fn start(name: &str, source: OwnedFd, mut sink: impl Sink + 'static, stop: Option<Arc<AtomicBool>>) -> JoinHandle<u64> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let mut source = File::from(source);
            let mut buf = vec![0u8; 64 * 1024];
            let mut moved = 0u64;
            loop {
                if let Some(stop) = &stop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let mut fds = [PollFd::new(source.as_fd(), PollFlags::POLLIN)];
                    match poll(&mut fds, PollTimeout::from(200u8)) {
                        Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                match source.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if sink.put(&buf[..n]).is_err() {
                            break;
                        }
                        moved += n as u64;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = sink.end();
            moved
        })
        .expect("spawn relay thread")
}

/// A sink that can be pointed elsewhere while a relay runs: the job's stdin goes to its local pipe, or over
/// the network to the node the job moved to.
#[derive(Clone, Default)]
pub struct Switch {
    inner: Arc<std::sync::Mutex<Option<Box<dyn Sink>>>>,
}

impl std::fmt::Debug for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Switch")
    }
}

impl Switch {
    /// Points the switch at `sink` (`None`: bytes are held back by blocking the relay until it is set again).
    pub fn set(&self, sink: Option<Box<dyn Sink>>) {
        *self.inner.lock().expect("switch lock") = sink;
    }
}

impl Sink for Switch {
    fn put(&mut self, data: &[u8]) -> std::io::Result<()> {
        loop {
            let mut guard = self.inner.lock().expect("switch lock");
            if let Some(sink) = guard.as_mut() {
                return sink.put(data);
            }
            drop(guard);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn end(&mut self) -> std::io::Result<()> {
        match self.inner.lock().expect("switch lock").as_mut() {
            Some(sink) => sink.end(),
            None => Ok(()),
        }
    }
}

/// The write end of a job's stdin pipe, shared between the job's runner (which closes it when the input
/// ends or the job moves) and the relay feeding it.
#[derive(Debug, Clone)]
pub struct SharedPipe(pub Arc<std::sync::Mutex<Option<Arc<File>>>>);

impl Sink for SharedPipe {
    fn put(&mut self, data: &[u8]) -> std::io::Result<()> {
        // Written outside the lock: a job that does not read its input must not block whoever closes it.
        let pipe = self.0.lock().expect("stdin").clone();
        match pipe {
            Some(f) => (&*f).write_all(data),
            None => Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe)),
        }
    }

    fn end(&mut self) -> std::io::Result<()> {
        *self.0.lock().expect("stdin") = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_moves_everything_in_order() {
        let (r, w) = std::io::pipe().unwrap();
        let out = tempfile::NamedTempFile::new().unwrap();
        let sink = out.reopen().unwrap();
        let handle = spawn("test", OwnedFd::from(r), sink);
        let mut w = File::from(OwnedFd::from(w));
        let data: Vec<u8> = (0..1_000_000u32).map(|i| u8::try_from(i % 251).unwrap()).collect();
        w.write_all(&data).unwrap();
        drop(w);
        assert_eq!(handle.join().unwrap(), data.len() as u64);
        assert_eq!(std::fs::read(out.path()).unwrap(), data);
    }

    #[test]
    fn a_stoppable_relay_stops_while_its_source_is_silent() {
        let (r, _w) = std::io::pipe().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let handle = spawn_stoppable("test", OwnedFd::from(r), SharedPipe(Arc::default()), stop.clone());
        stop.store(true, Ordering::Relaxed);
        assert_eq!(handle.join().unwrap(), 0);
    }
}
