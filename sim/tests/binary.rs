//! The `vllm-sim` binary: it says where it listens, serves, exits 0 on
//! SIGTERM and 64 on a bad flag.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_vllm-sim");
const T: Duration = Duration::from_secs(10);

/// Waits for the child in a thread, so that the test can give up.
fn wait_with_timeout(mut child: std::process::Child) -> Option<ExitStatus> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    rx.recv_timeout(T).ok().and_then(Result::ok)
}

#[test]
fn serves_until_sigterm() {
    let mut child = Command::new(BIN)
        .args([
            "--port",
            "0",
            "--model",
            "m",
            "--seed",
            "9",
            "--prefix-cache-blocks",
            "500",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(
        line.contains("model m")
            && line.contains("seed 9")
            && line.contains("prefix cache 500 blocks of 16 tokens"),
        "{line}"
    );
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split("/v1").next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();

    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = wait_with_timeout(child).expect("vllm-sim did not exit on SIGTERM");
    assert_eq!(status.code(), Some(0));
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("SIGTERM"), "{rest}");
}

#[test]
fn bad_flags_are_usage_errors() {
    for args in [
        &["--reject-status", "500"][..],
        &["--output-tokens", "poisson:3"],
        &["--error-rate", "0.7", "--stall-rate", "0.7"],
        &["--no-such-flag"],
        &["--block-size", "0"],
        &["--served-model-name"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--max-num-seqs",
        "--max-num-queued-reqs",
        "--reject-status",
        "--ttft-ms",
        "--itl-base-ms",
        "--itl-per-seq-ms",
        "--output-tokens",
        "--error-rate",
        "--stall-rate",
        "--reset-rate",
        "--seed",
        "--served-model-name",
        "--block-size",
        "--prefix-cache-blocks",
        "--no-enable-prefix-caching",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}
