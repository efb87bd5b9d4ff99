//! The command-line options of the benchmark examples: `--name value` pairs, nothing else.
//! Included by each example with `#[path = "args.rs"] mod args;`.

use std::str::FromStr;

/// The value after the first `name` on the command line, if there is one.
pub fn string(name: &str) -> Option<String> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == name {
            return args.next();
        }
    }
    None
}

/// The number after `name`, or `default` when the option is absent. A value that is not a
/// number stops the run rather than measuring something else than asked for.
pub fn number<T: FromStr>(name: &str, default: T) -> T {
    match string(name) {
        None => default,
        Some(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name} takes a number, not {v:?}")),
    }
}
