//! `vllm-chat`: talk to vllm-mqttd from a terminal.
//!
//! One-shot: `vllm-chat -p maze -s s1 -m "hello"` prints the reply (or the
//! reply JSON with `--json`) and exits 0, or prints the error and exits
//! non-zero. Without `-m` it is an interactive REPL with line editing and
//! history (rustyline), and the commands `/reset`, `/prompt <system
//! prompt>`, `/session`, `/help` and `/exit`.
//!
//! Answers are streamed (protocol v1.1) and printed as they come;
//! `--no-stream` waits for the whole reply instead. With `--json` every
//! message is printed as a JSON line (the deltas, then the final reply).
//! Ctrl-C during an answer cancels that request at the daemon (which stops
//! the generation) and returns to the prompt; in one-shot mode it exits
//! with status 130.

#![forbid(unsafe_code)]

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use rustyline::error::ReadlineError;
use vllm_chat::cli::{self, BrokerArgs, MqttVersion, EXIT_USAGE};
use vllm_chat::protocol::{ErrorCode, Reply, StreamBy};
use vllm_chat::{ChatRequest, Client, ClientError, StreamEvent};

/// Exit status when the daemon answered with an error or did not answer.
const EXIT_FAILED: u8 = 1;
/// Exit status after Ctrl-C cancelled the answer (128 + SIGINT).
const EXIT_CANCELLED: u8 = 130;

/// Chat with vllm-mqttd over MQTT: one message with -m, or an interactive
/// session.
#[derive(Debug, Parser)]
#[command(name = "vllm-chat", version)]
struct Cli {
    #[command(flatten)]
    broker: BrokerArgs,
    /// MQTT version.
    #[arg(long, value_enum, default_value = "5")]
    mqtt_version: MqttVersion,
    /// Project (the request topic is PROJECT/user_input).
    #[arg(short, long, default_value = "general")]
    project: String,
    /// Session id (conversation key); default: a random chat-<hex>.
    #[arg(short, long)]
    session: Option<String>,
    /// Send this message, print the reply and exit ("-" reads stdin).
    #[arg(short, long)]
    message: Option<String>,
    /// Print the reply as JSON (as the daemon sent it) instead of its text;
    /// streamed, one JSON line per delta, then the final reply.
    #[arg(long)]
    json: bool,
    /// Wait for the whole reply instead of printing the answer as it is
    /// generated.
    #[arg(long)]
    no_stream: bool,
    /// Cut the streamed answer at sentence ends instead of every 50 ms or
    /// so (the daemon's stream_interval).
    #[arg(long, conflicts_with = "no_stream")]
    by_sentence: bool,
    /// System prompt for this session (kept by the daemon until a reset).
    #[arg(long)]
    system_prompt: Option<String>,
    /// Clear the session's history before the message.
    #[arg(long)]
    reset: bool,
    /// Sampling temperature.
    #[arg(long)]
    temperature: Option<f64>,
    /// Longest completion, in tokens.
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Give up after this long, retries included.
    #[arg(long, default_value = "120s", value_parser = cli::parse_duration)]
    timeout: Duration,
    /// Attempts per message (1: no retries).
    #[arg(long, default_value_t = 5)]
    max_attempts: u32,
    /// Least time between two sends.
    #[arg(long, default_value = "500ms", value_parser = cli::parse_duration)]
    min_interval: Duration,
    /// REPL history file (default ~/.vllm_chat_history).
    #[arg(long)]
    history_file: Option<PathBuf>,
    /// More log output on stderr (-v, -vv).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn main() -> ExitCode {
    let cli: Cli = match cli::parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    cli::init_logging(cli.verbose);
    let options = match cli.broker.options(cli.mqtt_version.into()) {
        Ok(mut o) => {
            o.timeout = cli.timeout;
            o.reply_timeout = cli.timeout;
            o.max_attempts = cli.max_attempts;
            o.min_interval = cli.min_interval;
            o
        }
        Err(e) => return fail(cli::exit_code(&e), &e),
    };
    if let Err(e) = options.validate() {
        return fail(EXIT_USAGE, &e);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return fail(cli::EXIT_UNAVAILABLE, &e),
    };
    let client = match runtime.block_on(Client::connect(options)) {
        Ok(c) => c,
        Err(e) => return fail(cli::exit_code(&e), &e),
    };
    let session = cli
        .session
        .clone()
        .unwrap_or_else(|| format!("chat-{:08x}", rand::random::<u32>()));
    let code = match &cli.message {
        Some(m) => one_shot(&runtime, &client, &cli, &session, m),
        None => repl(&runtime, &client, &cli, session),
    };
    runtime.block_on(client.disconnect());
    code
}

fn fail(code: u8, e: &dyn std::fmt::Display) -> ExitCode {
    vllm_plumbing::fail("vllm-chat", code, e)
}

fn request(
    cli: &Cli,
    session: &str,
    message: &str,
    reset: bool,
    prompt: Option<&str>,
) -> ChatRequest {
    let mut req = ChatRequest::new(&cli.project, session, message).reset(reset);
    if let Some(p) = prompt {
        req = req.system_prompt(p);
    }
    if let Some(t) = cli.temperature {
        req = req.temperature(t);
    }
    if let Some(n) = cli.max_tokens {
        req = req.max_tokens(n);
    }
    if cli.by_sentence {
        req = req.stream_by(StreamBy::Sentence);
    }
    req
}

/// How one message ended.
enum Outcome {
    /// Answered (and printed).
    Answered,
    /// The daemon answered with an error, or none came.
    Failed(ClientError),
    /// Ctrl-C cancelled it.
    Cancelled,
}

/// Sends `req`, printing the answer as it comes (or at once with
/// `--no-stream`); Ctrl-C cancels it at the daemon.
async fn exchange(client: &Client, cli: &Cli, req: &ChatRequest) -> Outcome {
    if cli.no_stream {
        let reply = tokio::select! {
            r = client.send(req) => r,
            _ = tokio::signal::ctrl_c() => {
                // Stop the generation too, not only the wait for it, so
                // the next message does not queue behind it.
                if let Err(e) = client.cancel(req.project(), req.session()).await {
                    eprintln!("(the daemon was not told to stop: {e})");
                }
                return Outcome::Cancelled;
            }
        };
        return match reply {
            Ok(reply) => {
                if cli.json {
                    println!("{}", reply_json(&reply));
                } else {
                    println!("{}", reply.text.unwrap_or_default());
                }
                Outcome::Answered
            }
            Err(e) => Outcome::Failed(e),
        };
    }
    let mut stream = match client.stream(req).await {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(e),
    };
    let mut out = std::io::stdout().lock();
    // Deltas printed; the final reply's `seq` says how many were sent.
    let mut printed = 0u32;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut cancelled = false;
    loop {
        let event = tokio::select! {
            e = stream.next() => e,
            _ = &mut ctrl_c, if !cancelled => {
                // The stream's end is then the daemon's `cancelled`.
                cancelled = true;
                stream.cancel();
                continue;
            }
        };
        match event {
            Some(Ok(StreamEvent::Delta(d))) if cli.json => {
                let _ = writeln!(out, "{}", serde_json::to_string(&d).unwrap_or_default());
            }
            Some(Ok(StreamEvent::Delta(d))) => {
                printed += 1;
                let _ = write!(out, "{}", d.delta);
                let _ = out.flush();
            }
            Some(Ok(StreamEvent::Done(reply))) if cli.json => {
                let _ = writeln!(out, "{}", reply_json(&reply));
                return Outcome::Answered;
            }
            Some(Ok(StreamEvent::Done(reply))) => {
                let text = reply.text.unwrap_or_default();
                if printed == 0 {
                    let _ = writeln!(out, "{text}");
                } else if reply.seq == Some(printed) {
                    let _ = writeln!(out);
                } else {
                    // A delta was lost on the way (they go at QoS 0); the
                    // final reply has the whole answer.
                    let _ = writeln!(out);
                    eprintln!("(part of the answer was lost on the way; here it is whole)");
                    let _ = writeln!(out, "{text}");
                }
                return Outcome::Answered;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                if printed > 0 {
                    let _ = writeln!(out);
                }
                let by_us = matches!(e, ClientError::Cancelled)
                    || (cancelled && e.code() == Some(ErrorCode::Cancelled));
                return if by_us {
                    Outcome::Cancelled
                } else {
                    Outcome::Failed(e)
                };
            }
            None => {
                return Outcome::Failed(ClientError::Connection(
                    "the client is shutting down".into(),
                ))
            }
        }
    }
}

fn reply_json(reply: &Reply) -> String {
    serde_json::to_string(reply).unwrap_or_default()
}

fn one_shot(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    cli: &Cli,
    session: &str,
    message: &str,
) -> ExitCode {
    let message = if message == "-" {
        let mut s = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut s) {
            return fail(EXIT_USAGE, &format!("cannot read stdin: {e}"));
        }
        s
    } else {
        message.to_owned()
    };
    let req = request(
        cli,
        session,
        &message,
        cli.reset,
        cli.system_prompt.as_deref(),
    );
    match runtime.block_on(exchange(client, cli, &req)) {
        Outcome::Answered => ExitCode::SUCCESS,
        Outcome::Cancelled => fail(EXIT_CANCELLED, &"cancelled"),
        Outcome::Failed(ClientError::Server { reply, .. }) if cli.json => {
            println!("{}", reply_json(&reply));
            ExitCode::from(EXIT_FAILED)
        }
        Outcome::Failed(e @ ClientError::InvalidRequest(_)) => fail(EXIT_USAGE, &e),
        Outcome::Failed(e) => fail(EXIT_FAILED, &e),
    }
}

const HELP: &str = "\
commands:
  /reset            clear the conversation (with your next message)
  /prompt <text>    set the system prompt for this session (with your next message)
  /session          show the project and session
  /help             this list
  /exit             leave (or Ctrl-D)";

fn history_path(cli: &Cli) -> Option<PathBuf> {
    cli.history_file
        .clone()
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".vllm_chat_history")))
}

fn repl(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    cli: &Cli,
    session: String,
) -> ExitCode {
    let mut editor = match rustyline::DefaultEditor::new() {
        Ok(e) => e,
        Err(e) => {
            return fail(
                cli::EXIT_UNAVAILABLE,
                &format!("cannot open the terminal: {e}"),
            )
        }
    };
    let history = history_path(cli);
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    eprintln!(
        "connected to {}:{} as {}; project {}, session {}. /help for commands.",
        cli.broker.mqtt_host,
        cli.broker.mqtt_port,
        client.client_id(),
        cli.project,
        session
    );
    // Settings that ride on the next message (the protocol has no
    // message-less commands); kept until a message is answered.
    let mut reset = cli.reset;
    let mut prompt = cli.system_prompt.clone();
    let prompt_str = format!("{}/{}> ", cli.project, session);
    loop {
        let line = match editor.readline(&prompt_str) {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => {
                eprintln!("vllm-chat: {e}");
                break;
            }
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line);
        match line
            .split_once(' ')
            .map_or((line, ""), |(c, r)| (c, r.trim()))
        {
            ("/exit" | "/quit", _) => break,
            ("/help", _) => {
                eprintln!("{HELP}");
                continue;
            }
            ("/session", _) => {
                eprintln!("project {}, session {}", cli.project, session);
                continue;
            }
            ("/reset", _) => {
                reset = true;
                eprintln!("(the conversation is cleared with your next message)");
                continue;
            }
            ("/prompt", "") => {
                eprintln!("usage: /prompt <system prompt>");
                continue;
            }
            ("/prompt", text) => {
                prompt = Some(text.to_owned());
                eprintln!("(system prompt set with your next message)");
                continue;
            }
            (cmd, _) if cmd.starts_with('/') => {
                eprintln!("unknown command {cmd}; /help lists them");
                continue;
            }
            _ => {}
        }
        let req = request(cli, &session, line, reset, prompt.as_deref());
        match runtime.block_on(exchange(client, cli, &req)) {
            Outcome::Answered => {
                reset = false;
                prompt = None;
            }
            Outcome::Failed(e) => eprintln!("error: {e}"),
            Outcome::Cancelled => eprintln!("(cancelled)"),
        }
    }
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    ExitCode::SUCCESS
}
