//! The WebSocket terminal in a real browser, as AION's UI uses it: xterm.js in
//! headless Chromium (Debian's) driven by playwright-core, against this build
//! of the connector. The work is in tests/browser/run.sh, which installs what
//! it needs (Chromium with apt-get, the npm packages into target/browser-e2e).

use std::process::Command;

#[test]
fn xterm_js_in_chromium_types_and_sees_the_echo() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{root}/tests/browser/run.sh"))
        .current_dir(root)
        .env("AION_BIN", env!("CARGO_BIN_EXE_aion-connector"))
        .output()
        .expect("run tests/browser/run.sh");
    assert!(
        out.status.success(),
        "tests/browser/run.sh failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
