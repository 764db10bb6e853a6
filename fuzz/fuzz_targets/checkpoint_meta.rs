//! The JSON half of a checkpoint: any bytes parse to metadata or an error; metadata that parses
//! is then validated like a resumed run's config.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(meta) = ddpm_train::checkpoint::parse_meta(data, Path::new("ckpt-00000001.json")) {
        let _ = meta.config.validate();
    }
});
