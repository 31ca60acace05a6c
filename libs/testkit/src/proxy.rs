//! A TCP proxy a test can cut, to partition a client from a server (a ZooKeeper session that
//! must expire, say) without touching either process.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// Forwards `127.0.0.1:<port>` to a target. [`TcpProxy::cut`] drops every connection and
/// refuses new ones; [`TcpProxy::blackhole`] keeps the connections open but lets nothing
/// through (a silent partition: only timeouts notice). [`TcpProxy::restore`] ends either;
/// dropping the proxy stops it.
pub struct TcpProxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    silent: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    stopped: Arc<AtomicBool>,
}

/// Copies `from` to `to`, dropping what arrives while `silent`.
fn pump(mut from: TcpStream, mut to: TcpStream, silent: Arc<AtomicBool>) {
    use std::io::{Read, Write};
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if silent.load(Ordering::Acquire) {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

impl TcpProxy {
    pub fn start(target: SocketAddr) -> io::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stopped = Arc::new(AtomicBool::new(false));
        let silent = Arc::new(AtomicBool::new(false));
        let (c, o, s, q) = (cut.clone(), open.clone(), stopped.clone(), silent.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::Acquire) {
                    return;
                }
                let Ok(client) = client else { continue };
                if c.load(Ordering::Acquire) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                if let (Ok(c1), Ok(s1)) = (client.try_clone(), server.try_clone()) {
                    let mut open = o.lock().unwrap_or_else(|p| p.into_inner());
                    open.push(c1);
                    open.push(s1);
                }
                let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                let (q1, q2) = (q.clone(), q.clone());
                thread::spawn(move || pump(client, server2, q1));
                thread::spawn(move || pump(server, client2, q2));
            }
        });
        Ok(TcpProxy {
            addr,
            cut,
            silent,
            open,
            stopped,
        })
    }

    /// `127.0.0.1:<port>` to connect to instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every forwarded connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        for stream in self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Keeps connections open but forwards nothing, in either direction.
    pub fn blackhole(&self) {
        self.silent.store(true, Ordering::Release);
    }

    /// Forwards again (new connections after a cut; traffic after a blackhole).
    pub fn restore(&self) {
        self.cut.store(false, Ordering::Release);
        self.silent.store(false, Ordering::Release);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Release);
        self.cut();
        // Wakes the accept loop so it sees `stopped`.
        let _ = TcpStream::connect(self.addr);
    }
}
