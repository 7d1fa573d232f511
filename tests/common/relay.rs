//! A relay a test controls, to cut one link on loopback (no network namespaces needed).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

/// A TCP relay a test puts in front of one link (r1's etcd, r1's peer listener) to cut it as a
/// partition would: while cut, bytes stop flowing both ways and new connections wait, without a
/// RST or a close. A connection accepted before the target is known (the relay starts before
/// the process behind it) or while cut waits, then is forwarded.
pub struct Relay {
    pub addr: SocketAddr,
    /// Where to forward, once known.
    pub target: Arc<OnceLock<SocketAddr>>,
    cut: Arc<AtomicBool>,
}

impl Relay {
    pub fn start() -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let addr = listener.local_addr().expect("relay address");
        let (target, cut) = (
            Arc::new(OnceLock::<SocketAddr>::new()),
            Arc::new(AtomicBool::new(false)),
        );
        let (to, blackhole) = (target.clone(), cut.clone());
        thread::spawn(move || {
            for near in listener.incoming() {
                let Ok(near) = near else { return };
                let (to, cut) = (to.clone(), blackhole.clone());
                thread::spawn(move || {
                    let target = loop {
                        match to.get() {
                            Some(t) if !cut.load(Ordering::SeqCst) => break *t,
                            _ => thread::sleep(Duration::from_millis(10)),
                        }
                    };
                    let Ok(far) = TcpStream::connect(target) else {
                        return;
                    };
                    let (near2, far2) = (near.try_clone().unwrap(), far.try_clone().unwrap());
                    let c2 = cut.clone();
                    thread::spawn(move || pump(far2, near2, &c2));
                    pump(near, far, &cut);
                });
            }
        });
        Relay { addr, target, cut }
    }

    /// Cuts the link: nothing flows until [`Relay::heal`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Copies `from` to `to`; while the link is cut, bytes read wait (the connection stays open).
fn pump(mut from: TcpStream, mut to: TcpStream, cut: &AtomicBool) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        while cut.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(5));
        }
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}
