//! The transmission phase's reader over a real socket: records straight
//! into the caller's buffers or through `plain`, whatever the read sizes
//! and however the records arrive; what the receive half needs sent goes
//! out from the reader.

use std::io::{IoSliceMut, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use super::{Input, Link, Output};
use crate::server::tls::records::{Cipher, Schedule, Secret, Session, Version};

fn secret(c: Cipher, label: u8, gen: u8) -> Secret {
    let n = if c == Cipher::Aes128Gcm { 16 } else { 32 };
    Secret { cipher: c, key: (0..n).map(|i| i ^ label ^ (gen << 4)).collect(), iv: [label.wrapping_mul(3) ^ gen; 12] }
}

struct Gen(Cipher, (u8, u8), (u8, u8));

impl Schedule for Gen {
    fn next_rx(&mut self) -> Result<Secret, String> {
        self.1 .1 += 1;
        Ok(secret(self.0, self.1 .0, self.1 .1))
    }
    fn next_tx(&mut self) -> Result<Secret, String> {
        self.2 .1 += 1;
        Ok(secret(self.0, self.2 .0, self.2 .1))
    }
}

/// The server's reader and writer over a socket pair; the client's
/// session and socket.
fn setup(v: Version, c: Cipher) -> (Input, Output, Session, UnixStream) {
    let side = |rx: u8, tx: u8| {
        let g: Option<Box<dyn Schedule>> = (v == Version::Tls13).then(|| Box::new(Gen(c, (rx, 0), (tx, 0))) as _);
        Session::new(v, (1, secret(c, rx, 0)), (1, secret(c, tx, 0)), g, Vec::new()).unwrap()
    };
    let (server, client) = (side(1, 2), side(2, 1));
    let (a, b) = UnixStream::pair().unwrap();
    let (rx, tx) = server.split();
    let link = Arc::new(Link { tx: Mutex::new(tx), rx: Mutex::new(Some((rx, b"left".to_vec()))) });
    let w = std::fs::File::from(std::os::fd::OwnedFd::from(a.try_clone().unwrap()));
    let r = std::fs::File::from(std::os::fd::OwnedFd::from(a));
    (Input::tls(&link, r), Output::tls(&link, w), client, b)
}

fn wire(s: &mut Session) -> Vec<u8> {
    let mut w = Vec::new();
    s.flush_to(&mut w).unwrap();
    w
}

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 13 + i / 509) as u8).collect()
}

#[test]
fn any_read_sizes_get_the_plaintext_in_order() {
    for (v, c) in [(Version::Tls12, Cipher::Aes128Gcm), (Version::Tls12, Cipher::Chacha20Poly1305), (Version::Tls13, Cipher::Aes256Gcm)] {
        let (mut input, _output, mut cl, mut sock) = setup(v, c);
        let msg = data(1_500_000);
        let mut w = Vec::new();
        // Records of every size: NBD requests' headers and payloads.
        for (i, piece) in msg.chunks(70_001).enumerate() {
            for part in piece.chunks([28, 16384, 100, 32768, 5][i % 5]) {
                cl.encrypt(part).unwrap();
                w.extend(wire(&mut cl));
            }
        }
        cl.close();
        w.extend(wire(&mut cl));
        let sender = std::thread::spawn(move || {
            // Cut anywhere, records split across reads.
            for (i, p) in w.chunks(9_999).enumerate() {
                sock.write_all(p).unwrap();
                if i % 50 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            sock
        });
        let mut got = Vec::new();
        let sizes = [1, 4, 16384, 16400, 100_000, 7, 300_000, 16401, 28];
        for i in 0.. {
            let k = sizes[i % sizes.len()];
            let mut a = vec![0u8; k];
            let mut b = vec![0u8; 3 * k];
            let n = if i % 2 == 0 {
                input.read(&mut a).unwrap()
            } else {
                input.read_vectored(&mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut []), IoSliceMut::new(&mut b)]).unwrap()
            };
            if n == 0 {
                break;
            }
            let both = [a, b].concat();
            got.extend_from_slice(&both[..n]);
        }
        assert_eq!(got.len(), msg.len() + 4, "{v:?} {c:?}");
        assert!(got[..4] == *b"left" && got[4..] == msg[..], "{v:?} {c:?}");
        drop(sender.join().unwrap());
    }
}

#[test]
fn the_reader_sends_what_the_receive_half_asks() {
    // Small reads (through the read buffer) and big ones (straight into the caller's).
    for size in [64, 65536] {
        the_reader_sends(size);
    }
}

fn the_reader_sends(size: usize) {
    let (mut input, mut output, mut cl, mut sock) = setup(Version::Tls13, Cipher::Aes128Gcm);
    let mut buf = vec![0u8; size];
    // A KeyUpdate with update_requested: the reader answers at once.
    cl.key_update(true).unwrap();
    cl.encrypt(b"x").unwrap();
    sock.write_all(&wire(&mut cl)).unwrap();
    assert_eq!(input.read(&mut buf).unwrap(), 4);
    assert_eq!(input.read(&mut buf).unwrap(), 1);
    let mut answer = [0u8; 5 + 5 + 1 + 16];
    sock.read_exact(&mut answer).unwrap();
    let mut back = Vec::new();
    cl.feed(&answer, &mut back).unwrap();
    assert!(back.is_empty());
    // A writer's reply, on the new keys.
    output.write_all(b"reply").unwrap();
    let mut rec = [0u8; 5 + 5 + 1 + 16];
    sock.read_exact(&mut rec).unwrap();
    cl.feed(&rec, &mut back).unwrap();
    assert_eq!(back, b"reply");
    // A bad record: the read fails and the alert goes out.
    sock.write_all(&[23, 3, 3, 0, 20]).unwrap();
    sock.write_all(&[0; 20]).unwrap();
    assert!(input.read(&mut buf).is_err());
    let mut alert = [0u8; 5 + 2 + 1 + 16];
    sock.read_exact(&mut alert).unwrap();
    let e = cl.feed(&alert, &mut back).unwrap_err();
    assert!(e.to_string().contains("alert 20"), "{e}");
    // The writer has nothing more to send, not even close_notify.
    assert!(output.write_all(b"more").is_err());
    drop((input, output));
    assert_eq!(sock.read(&mut buf).unwrap(), 0, "nothing after the fatal alert");
}
