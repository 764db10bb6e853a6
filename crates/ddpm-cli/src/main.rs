//! The `ddpm` command.
fn main() {}
