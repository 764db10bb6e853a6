//! Image-folder files (JPEG, PNG, GIF): any bytes decode to (3, size, size) pixels or an error.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

const SIZE: u32 = 8;

fuzz_target!(|data: &[u8]| {
    if let Ok(px) = ddpm_data::folder::decode_image(data.to_vec(), Path::new("fuzz.png"), SIZE) {
        assert_eq!(px.len(), 3 * (SIZE * SIZE) as usize);
    }
});
