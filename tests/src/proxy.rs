//! A UDP forwarder on loopback that a test can put between two QUIC endpoints and then cut
//! (every datagram in both directions is dropped, as in a network partition) and heal.
//!
//! Clients send to [`UdpProxy::addr`]; each client address gets its own upstream socket, so the
//! upstream sees one stable peer per client and replies find their way back. The upstream can
//! be set after the proxy is bound, because a node must be told the proxy's address (its
//! `advertise`) before it starts and learns its own listening port. Plain threads and blocking
//! sockets: no runtime needed, and a read timeout lets every thread notice the stop flag.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// Larger than any QUIC datagram.
const MAX_DATAGRAM: usize = 65_536;

#[derive(Debug, Default)]
struct Shared {
    upstream: Mutex<Option<SocketAddr>>,
    cut: AtomicBool,
    stop: AtomicBool,
    forwarded: AtomicU64,
    dropped: AtomicU64,
}

impl Shared {
    /// Whether a datagram may pass now; counts it either way.
    fn pass(&self) -> bool {
        if self.cut.load(Ordering::SeqCst) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            false
        } else {
            self.forwarded.fetch_add(1, Ordering::Relaxed);
            true
        }
    }
}

/// A running proxy; stops (and its threads end) when dropped.
#[derive(Debug)]
pub struct UdpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    front: Option<JoinHandle<()>>,
}

impl UdpProxy {
    /// Binds on an ephemeral loopback port. Until [`UdpProxy::set_upstream`] is called,
    /// datagrams are dropped.
    pub fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("binding the proxy");
        socket.set_read_timeout(Some(POLL)).expect("read timeout");
        let addr = socket.local_addr().expect("proxy address");
        let shared = Arc::new(Shared::default());
        let front = {
            let shared = shared.clone();
            std::thread::spawn(move || forward_from_clients(socket, shared))
        };
        Self {
            addr,
            shared,
            front: Some(front),
        }
    }

    /// Where clients send: the address to advertise.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where datagrams go.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self
            .shared
            .upstream
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(upstream);
    }

    /// Drops every datagram, both ways, from now on.
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
    }

    /// Lets datagrams through again.
    pub fn heal(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Datagrams forwarded and dropped so far (both directions).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.shared.forwarded.load(Ordering::Relaxed),
            self.shared.dropped.load(Ordering::Relaxed),
        )
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(front) = self.front.take() {
            let _ = front.join();
        }
    }
}

/// Client → upstream, opening an upstream socket (and its return thread) per client.
fn forward_from_clients(front: UdpSocket, shared: Arc<Shared>) {
    let mut clients: HashMap<SocketAddr, UdpSocket> = HashMap::new();
    let mut returns = Vec::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !shared.stop.load(Ordering::SeqCst) {
        let Ok((n, client)) = front.recv_from(&mut buf) else {
            continue; // timeout (or a transient error): look at the stop flag again
        };
        let upstream = *shared.upstream.lock().unwrap_or_else(|p| p.into_inner());
        let Some(upstream) = upstream else {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        if !shared.pass() {
            continue;
        }
        let back = match clients.entry(client) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let Some(back) = open_upstream(upstream) else {
                    continue;
                };
                let (Ok(back_reader), Ok(front_writer)) = (back.try_clone(), front.try_clone())
                else {
                    continue;
                };
                let shared = shared.clone();
                returns.push(std::thread::spawn(move || {
                    forward_to_client(back_reader, front_writer, client, shared);
                }));
                e.insert(back)
            }
        };
        let _ = back.send(&buf[..n]);
    }
    for r in returns {
        let _ = r.join();
    }
}

fn open_upstream(upstream: SocketAddr) -> Option<UdpSocket> {
    let back = UdpSocket::bind("127.0.0.1:0").ok()?;
    back.connect(upstream).ok()?;
    back.set_read_timeout(Some(POLL)).ok()?;
    Some(back)
}

/// Upstream → one client.
fn forward_to_client(back: UdpSocket, front: UdpSocket, client: SocketAddr, shared: Arc<Shared>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !shared.stop.load(Ordering::SeqCst) {
        let Ok(n) = back.recv(&mut buf) else {
            continue;
        };
        if shared.pass() {
            let _ = front.send_to(&buf[..n], client);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_both_ways_and_drops_everything_while_cut() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let proxy = UdpProxy::start();
        proxy.set_upstream(server.local_addr().unwrap());
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 16];

        client.send_to(b"ping", proxy.addr()).unwrap();
        let (n, via) = server.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
        server.send_to(b"pong", via).unwrap();
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"pong"[..], proxy.addr()));

        proxy.cut();
        client.send_to(b"lost", proxy.addr()).unwrap();
        server.send_to(b"lost", via).unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(server.recv_from(&mut buf).is_err());
        assert!(client.recv_from(&mut buf).is_err());
        assert_eq!(proxy.counts(), (2, 2));

        proxy.heal();
        client.send_to(b"back", proxy.addr()).unwrap();
        let (n, _) = server.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"back");
    }
}
