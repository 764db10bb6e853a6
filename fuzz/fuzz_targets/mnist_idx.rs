//! MNIST IDX files (raw or gzip): any bytes give images/labels or an error, never a panic or an
//! allocation beyond what the bytes can fill.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.idx");
    if let Ok(images) = ddpm_data::mnist::parse_images(data, path) {
        assert_eq!(
            images.pixels.len(),
            images.count * images.rows * images.cols
        );
    }
    let _ = ddpm_data::mnist::parse_labels(data, path);
});
