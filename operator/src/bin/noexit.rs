//! `noexit` (also `kubectl noexit`): the CLI for analysts, admins and auditors.

fn main() -> std::process::ExitCode {
    noexit_operator::cli::main()
}
