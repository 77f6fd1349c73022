//! Several backend URLs, each way the daemon takes them: `--backend-url`
//! repeated (or comma-separated), `VLLM_MQTTD_BACKEND_URL` as a
//! comma-separated list, and a list in the configuration file.
//!
//! The variable is set only in a child process (`check-config`, whose
//! output is the resolved configuration), never in this one: tests run on
//! threads of one process, and clap reads the environment.

use std::process::{Command, Stdio};

use clap::Parser;
use vllm_mqttd::cli::Cli;
use vllm_mqttd::config::{Config, Urls};

const A: &str = "http://10.0.0.1:8000/v1";
const B: &str = "http://10.0.0.2:8000/v1";
const C: &str = "http://gpu-c.internal:8001/v1";

fn urls(list: &[&str]) -> Urls {
    Urls(list.iter().map(|s| s.to_string()).collect())
}

/// Resolves `args` as the binary does (flags over the file over the
/// defaults). Only for arguments that give the URLs themselves: a flag
/// beats the variable, so the environment of this process cannot leak in.
fn resolve(args: &[&str]) -> Config {
    let cli = Cli::try_parse_from(std::iter::once("vllm-mqttd").chain(args.iter().copied()))
        .expect("valid arguments");
    cli.run.resolve().expect("valid configuration")
}

/// `vllm-mqttd check-config` with `args` and `env` (and no other
/// `VLLM_MQTTD_*` variable): the configuration it prints, parsed back.
fn check_config(args: &[&str], env: &[(&str, &str)]) -> Config {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vllm-mqttd"));
    cmd.arg("check-config")
        .args(args)
        .stdin(Stdio::null())
        .env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("VLLM_MQTTD_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run vllm-mqttd check-config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check-config failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    Config::from_toml(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn backend_url_given_twice_is_two_backends_in_order() {
    let c = resolve(&["--backend-url", A, "--backend-url", B]);
    assert_eq!(c.backend.url, urls(&[A, B]));
    // A comma-separated value is a list too, and mixes with repeats.
    let c = resolve(&["--backend-url", &format!("{B},{A}"), "--backend-url", C]);
    assert_eq!(c.backend.url, urls(&[B, A, C]));
}

#[test]
fn the_variable_takes_a_comma_separated_list() {
    let c = check_config(&[], &[("VLLM_MQTTD_BACKEND_URL", &format!("{A},{B},{C}"))]);
    assert_eq!(c.backend.url, urls(&[A, B, C]));
    // One URL is a list of one.
    let c = check_config(&[], &[("VLLM_MQTTD_BACKEND_URL", A)]);
    assert_eq!(c.backend.url, urls(&[A]));
    // The flag beats the variable, as for every setting.
    let c = check_config(
        &["--backend-url", C],
        &[("VLLM_MQTTD_BACKEND_URL", &format!("{A},{B}"))],
    );
    assert_eq!(c.backend.url, urls(&[C]));
}

#[test]
fn the_file_takes_a_list_or_one_url() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("list.toml");
    std::fs::write(
        &list,
        format!("[backend]\nurl = [\"{A}\", \"{B}\", \"{C}\"]\n"),
    )
    .unwrap();
    let one = dir.path().join("one.toml");
    std::fs::write(&one, format!("[backend]\nurl = \"{B}\"\n")).unwrap();
    let list = list.to_str().unwrap();
    let one = one.to_str().unwrap();

    assert_eq!(
        Config::from_file(list.as_ref()).unwrap().backend.url,
        urls(&[A, B, C])
    );
    assert_eq!(
        Config::from_file(one.as_ref()).unwrap().backend.url,
        urls(&[B])
    );
    // Through the binary too: the file's list survives resolution, and a
    // flag replaces the whole list (not one entry of it).
    assert_eq!(
        check_config(&["--config", list], &[]).backend.url,
        urls(&[A, B, C])
    );
    assert_eq!(
        resolve(&["--config", list, "--backend-url", C]).backend.url,
        urls(&[C])
    );
}
