//! aion-connector: one static binary that turns a Linux box into a server for AI
//! coding agents. `main` only maps the outcome of [`cli::run`] to an exit code;
//! everything else lives in one module per concern.

mod channel;
mod cli;
mod client;
mod config;
mod error;
mod git;
mod http;
mod lease;
mod logging;
mod nonce;
mod outbox;
mod poll;
mod proc;
mod pty;
mod runs;
mod shutdown;
mod signing;
mod starter;
mod terminal;
mod workspace;
mod wrap;
mod ws;

fn main() {
    let code = match cli::run(std::env::args_os().skip(1).collect()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("aion-connector: {err}");
            err.exit_code()
        }
    };
    std::process::exit(code);
}
