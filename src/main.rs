//! aion-connector: one static binary that turns a Linux box into a server for AI
//! coding agents. `main` only maps the outcome of [`cli::run`] to an exit code.
//!
//! Dependencies run one way (README, "Hacking"):
//! - command line: [`cli`];
//! - mode wiring: [`serve`] (push mode, its router and its local socket),
//!   [`poll`], [`mcp`] (the agents' MCP server), the `lease` command in
//!   [`lease::wrap`], [`doctor`] (the machine's checks);
//! - domain: [`project`], [`workspace`], [`runs`], [`terminal`],
//!   [`background`], [`poll`]'s sessions, [`lease`]'s holder;
//! - mechanisms: [`process`] (groups, supervision, PTY), [`delivery`] (outbox,
//!   HTTP client, signing), [`net`] (HTTP server, WebSocket), [`config`],
//!   [`shutdown`];
//! - leaves: [`text`], [`nonce`], [`version`], [`logging`], [`error`], [`metrics`].

mod background;
mod cli;
mod config;
mod delivery;
mod doctor;
mod error;
mod fds;
mod lease;
mod logging;
mod mcp;
mod metrics;
mod net;
mod nonce;
mod poll;
mod process;
mod project;
mod report;
mod runs;
mod serve;
mod shutdown;
mod terminal;
mod text;
mod version;
mod workspace;

fn main() {
    let result = cli::run(std::env::args_os().skip(1).collect());
    // Lines still queued for the log writer are written before anything else
    // and before the exit.
    logging::finish();
    let code = match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("aion-connector: {err}");
            err.exit_code()
        }
    };
    std::process::exit(code);
}
