//! The test harness itself: each server starts, answers, and is gone after drop.

use std::io::{Read, Write};
use std::net::TcpStream;

use instream_testkit::{RedisServer, ZooKeeperServer};

fn answers(addr: &str, request: &[u8], expect: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    s.write_all(request).unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).contains(expect)
}

#[test]
fn redis_starts_answers_and_stops() {
    let redis = RedisServer::start().unwrap();
    let addr = format!("127.0.0.1:{}", redis.port());
    assert!(answers(&addr, b"PING\r\n", "+PONG"));
    drop(redis);
    assert!(
        TcpStream::connect(&addr).is_err(),
        "redis must be gone after drop"
    );
}

#[test]
fn zookeeper_starts_answers_and_stops() {
    let zk = ZooKeeperServer::start().unwrap();
    let addr = zk.connect_string();
    assert!(answers(&addr, b"ruok", "imok"));
    drop(zk);
    assert!(
        TcpStream::connect(&addr).is_err(),
        "zookeeper must be gone after drop"
    );
}
