//! The binary's contract: configuration errors name the variable and exit non-zero
//! before anything connects.

use std::process::Command;

fn run(vars: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_webhook-relay"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    // Unreachable broker: a config error must be reported before any connection attempt.
    cmd.env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn configuration_errors_name_the_variable_in_one_line() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "DOWNSTREAM_URL"),
        (
            &[("DOWNSTREAM_URL", "http://x/"), ("MAX_ATTEMPTS", "many")],
            "MAX_ATTEMPTS",
        ),
        (
            &[("DOWNSTREAM_URL", "http://x/"), ("MAX_ATTEMPTS", "0")],
            "MAX_ATTEMPTS",
        ),
        (&[("DOWNSTREAM_URL", "::not a url::")], "DOWNSTREAM_URL"),
        (
            &[("DOWNSTREAM_URL", "http://x/"), ("AMQP_URL", "nope://")],
            "AMQP_URL",
        ),
    ];
    for (vars, var) in cases {
        let (code, stderr) = run(vars, &["serve"]);
        assert_ne!(code, 0, "{vars:?} must fail");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line, got {stderr:?}");
        assert!(lines[0].contains(var), "{var} named in {stderr:?}");
    }
}

#[test]
fn queue_first_receiver_needs_no_downstream() {
    // It gets past configuration and fails only at binding an impossible address.
    let (code, stderr) = run(
        &[
            ("INLINE_DELIVERY", "false"),
            ("LISTEN_ADDR", "203.0.113.1:1"),
        ],
        &["receiver"],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("LISTEN_ADDR"), "{stderr}");
    assert!(!stderr.contains("DOWNSTREAM_URL"), "{stderr}");
}
