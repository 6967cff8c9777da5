//! Free TCP ports on 127.0.0.1.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// The kernel picks it (bind to port 0) and the listener is closed right away,
/// so another process may still take it before the broker binds; the broker
/// helpers retry with fresh ports when a start fails. Within this process a
/// port is never handed out twice.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    for _ in 0..100 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|err| panic!("cannot bind 127.0.0.1:0: {err}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|err| panic!("local_addr of 127.0.0.1:0 listener: {err}"))
            .port();
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if given.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("no fresh free port on 127.0.0.1 after 100 tries");
}
