//! Stand-alone sandbox supervisor, for the crate's integration tests (the `kiln` binary
//! does the same when its argv[1] is `sandbox::INIT_ARG`).
#![forbid(unsafe_code)]

fn main() {
    if std::env::args().nth(1).as_deref() == Some(sandbox::INIT_ARG) {
        sandbox::init_main();
    }
    eprintln!(
        "usage: kiln-sandbox-init {} (spec on stdin, outcome on fd 3)",
        sandbox::INIT_ARG
    );
    std::process::exit(2);
}
