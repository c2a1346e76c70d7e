//! archctl: inspect and operate ARCH.
use clap::Parser;

fn main() {
    let cli = arch::archctl::Cli::parse();
    match arch::archctl::run(cli) {
        Ok(status) => std::process::exit(status),
        Err(e) => {
            eprintln!("archctl: {e:#}");
            std::process::exit(arch::archctl::exit_code(&e));
        }
    }
}
