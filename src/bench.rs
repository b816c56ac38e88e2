//! `worker bench`: queue throughput and pickup latency (written next).
use anyhow::Result;
use crate::config::Settings;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {}

pub async fn run(_settings: &Settings, _args: BenchArgs) -> Result<()> {
    Ok(())
}
