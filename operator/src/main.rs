//! `geoml-operator`: the operator binary and its subcommands.

use std::io::Write;

use clap::{Parser, Subcommand};

/// The geoml Kubernetes operator.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the Datacenter, SyncPolicy and TrainingJob CRDs as YAML.
    Crd,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            std::io::stdout().write_all(geoml_crds::crds_yaml()?.as_bytes())?;
        }
    }
    Ok(())
}
