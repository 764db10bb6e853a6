//! CIFAR-10 binary batches: any bytes give whole records with valid labels or an error.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = ddpm_data::cifar::parse_batch(data, Path::new("fuzz.bin")) {
        assert_eq!(
            batch.pixels.len(),
            batch.len() * ddpm_data::cifar::IMAGE_LEN
        );
        assert!(batch.labels.iter().all(|&l| l < 10));
    }
});
