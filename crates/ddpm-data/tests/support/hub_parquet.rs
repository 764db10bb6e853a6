//! Small image data sets as the Hub stores them, made in tests: a parquet file with the
//! `datasets` library's schema (an `image` struct `{bytes: binary, path: string}` and an `int64`
//! `label`, with the `ClassLabel` names in the `huggingface` key-value metadata), written with
//! the `parquet` crate. Include it with `#[path]`; it needs the `parquet` and `image` crates.

#![allow(dead_code)] // each test binary uses a part

use std::io::Cursor;
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

/// The schema `datasets` writes for `{"image": Image(), "label": ClassLabel(...)}`.
const SCHEMA: &str = "message schema {
  optional group image {
    optional binary bytes;
    optional binary path (STRING);
  }
  optional int64 label;
}";

/// One row: the image's encoded bytes (`None`: a null image) and its label.
pub struct Row {
    /// The encoded image (PNG, JPEG...), or `None` for a null.
    pub bytes: Option<Vec<u8>>,
    /// The class index.
    pub label: i64,
}

/// A `w` x `h` PNG filled with one colour (`grey`: a 1-channel PNG of the red value).
pub fn png(w: u32, h: u32, rgb: [u8; 3], grey: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let img: image::DynamicImage = if grey {
        image::GrayImage::from_pixel(w, h, image::Luma([rgb[0]])).into()
    } else {
        image::RgbImage::from_pixel(w, h, image::Rgb(rgb)).into()
    };
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// The colour of image `i` of [`tiny_rows`].
pub fn colour(i: usize) -> [u8; 3] {
    [(i * 12) as u8, (200 - i * 5) as u8, (i * 7 % 256) as u8]
}

/// `n` 8x6 solid-colour PNGs (colour [`colour`]`(i)`) with labels `i % classes`.
pub fn tiny_rows(n: usize, classes: i64, grey: bool) -> Vec<Row> {
    (0..n)
        .map(|i| Row {
            bytes: Some(png(8, 6, colour(i), grey)),
            label: i as i64 % classes,
        })
        .collect()
}

/// A parquet file of `rows` (snappy-compressed, like pyarrow's default), with `names` as the
/// label's `ClassLabel` names when given.
pub fn parquet_file(rows: &[Row], names: Option<&[&str]>) -> Vec<u8> {
    let schema = Arc::new(parse_message_type(SCHEMA).unwrap());
    let mut props = WriterProperties::builder().set_compression(Compression::SNAPPY);
    if let Some(names) = names {
        let names: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
        let json = format!(
            "{{\"info\": {{\"features\": {{\"image\": {{\"_type\": \"Image\"}}, \"label\": \
             {{\"names\": [{}], \"_type\": \"ClassLabel\"}}}}}}}}",
            names.join(", ")
        );
        props = props
            .set_key_value_metadata(Some(vec![KeyValue::new("huggingface".to_string(), json)]));
    }
    let mut buf = Vec::new();
    let mut writer = SerializedFileWriter::new(&mut buf, schema, Arc::new(props.build())).unwrap();
    let mut group = writer.next_row_group().unwrap();
    // image.bytes: definition level 2 = present, 1 = the struct without bytes.
    let values: Vec<ByteArray> = rows
        .iter()
        .filter_map(|r| r.bytes.clone().map(ByteArray::from))
        .collect();
    let defs: Vec<i16> = rows
        .iter()
        .map(|r| if r.bytes.is_some() { 2 } else { 1 })
        .collect();
    let mut col = group.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>()
        .write_batch(&values, Some(&defs), None)
        .unwrap();
    col.close().unwrap();
    // image.path: null everywhere (as for images given as bytes).
    let mut col = group.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>()
        .write_batch(&[], Some(&vec![1; rows.len()]), None)
        .unwrap();
    col.close().unwrap();
    let labels: Vec<i64> = rows.iter().map(|r| r.label).collect();
    let mut col = group.next_column().unwrap().unwrap();
    col.typed::<Int64Type>()
        .write_batch(&labels, Some(&vec![1; rows.len()]), None)
        .unwrap();
    col.close().unwrap();
    group.close().unwrap();
    writer.close().unwrap();
    buf
}
