//! diffusers' `UNet2DModel` (the network of the google/ddpm-* pipelines) as a [`DdpmUnet`](crate::DdpmUnet):
//! its `config.json` read into a [`DdpmUnetConfig`], and its weights (safetensors or a PyTorch
//! `.bin` pickle) renamed onto ours; and the way back, a [`DdpmUnet`](crate::DdpmUnet) written as a
//! `UNet2DModel` folder ([`save_unet_dir`], by the same rules).
//!
//! A `UNet2DModel` with the DDPM paper's settings (`time_embedding_type = "positional"`,
//! `flip_sin_to_cos = false`, `freq_shift = 1`, `downsample_padding = 0`, `norm_eps = 1e-6`,
//! single-head attention, `DownBlock2D`/`AttnDownBlock2D` and `UpBlock2D`/`AttnUpBlock2D` levels)
//! is parameter for parameter our [`DdpmUnet`](crate::DdpmUnet). A config that asks for anything else is refused
//! with an error naming the field and its value (a field absent from the file takes diffusers'
//! default, as diffusers itself does). Keys diffusers does not know are ignored, as diffusers
//! ignores them, and listed in [`DiffusersUnetConfig::notes`].
//!
//! The names differ by the rules of [`NAME_RULES`], [`RESNET_RULES`] and [`ATTENTION_RULES`]:
//! diffusers numbers its up path from the bottom level (`up_blocks.0` is our `up.{n-1}`), and its
//! attention projections are `Linear` weights `(out, in)` where ours are 1x1 convolutions
//! `(out, in, 1, 1)`. Loading is strict: every tensor of the file is used, every tensor of the
//! model is filled, and every shape is checked; the error names the tensor by its diffusers name.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use ddpm_unet::diffusers::load_unet_dir;
//!
//! // A pipeline directory (its `unet/` folder is used) or a flat model directory.
//! let loaded = load_unet_dir("ddpm-cifar10-32".as_ref(), &Device::Cpu, DType::F32)?;
//! println!("{} parameters", loaded.model.num_parameters());
//! # Ok::<(), ddpm_unet::UnetError>(())
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use serde_json::{Map, Value};

use crate::ddpm_unet::DdpmUnetConfig;
use crate::model::{DiffusionModel, ModelConfig};
use crate::weights::read_safetensors;
use crate::UnetError;

/// The config file of a diffusers model folder.
pub const CONFIG_FILE: &str = "config.json";
/// The weights file names diffusers writes, in the order they are looked for.
pub const WEIGHTS_FILES: [&str; 2] = [
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
];
/// The half-precision variants diffusers writes with `variant="fp16"`, in the order they are
/// looked for: read (into f32, as diffusers does with `variant="fp16"` and
/// `torch_dtype=torch.float32`) only where neither of [`WEIGHTS_FILES`] is present.
pub const FP16_VARIANT_FILES: [&str; 2] = [
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
];

/// Whether `path` names one of the [`FP16_VARIANT_FILES`].
pub fn is_fp16_variant(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| FP16_VARIANT_FILES.contains(&n))
}

/// The sub-folder of a pipeline directory that holds its UNet.
pub const UNET_SUBFOLDER: &str = "unet";

/// The mapping of tensor-name prefixes, ours to diffusers', one rule per row; the one place that
/// says how the names correspond. In a pattern, `{i}` and `{j}` stand for a level and a block
/// index, `{n-1-i}` for the level counted from the bottom (`n` levels), `<resnet>` and `<attn>`
/// for the rest of a name inside a ResNet block or an attention block (renamed by
/// [`RESNET_RULES`] and [`ATTENTION_RULES`]), and `*` for `weight` or `bias`, unchanged.
pub const NAME_RULES: [(&str, &str); 15] = [
    ("temb.dense.0.*", "time_embedding.linear_1.*"),
    ("temb.dense.1.*", "time_embedding.linear_2.*"),
    ("class_emb.*", "class_embedding.*"),
    ("conv_in.*", "conv_in.*"),
    (
        "down.{i}.block.{j}.<resnet>",
        "down_blocks.{i}.resnets.{j}.<resnet>",
    ),
    (
        "down.{i}.attn.{j}.<attn>",
        "down_blocks.{i}.attentions.{j}.<attn>",
    ),
    (
        "down.{i}.downsample.conv.*",
        "down_blocks.{i}.downsamplers.0.conv.*",
    ),
    ("mid.block_1.<resnet>", "mid_block.resnets.0.<resnet>"),
    ("mid.attn_1.<attn>", "mid_block.attentions.0.<attn>"),
    ("mid.block_2.<resnet>", "mid_block.resnets.1.<resnet>"),
    (
        "up.{i}.block.{j}.<resnet>",
        "up_blocks.{n-1-i}.resnets.{j}.<resnet>",
    ),
    (
        "up.{i}.attn.{j}.<attn>",
        "up_blocks.{n-1-i}.attentions.{j}.<attn>",
    ),
    (
        "up.{i}.upsample.conv.*",
        "up_blocks.{n-1-i}.upsamplers.0.conv.*",
    ),
    ("norm_out.*", "conv_norm_out.*"),
    ("conv_out.*", "conv_out.*"),
];

/// Layers of a ResNet block: ours, diffusers' `ResnetBlock2D`.
pub const RESNET_RULES: [(&str, &str); 6] = [
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("temb_proj", "time_emb_proj"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("nin_shortcut", "conv_shortcut"),
];

/// Layers of an attention block: ours, diffusers' `Attention`, and the names of diffusers' first
/// releases (the old `AttentionBlock`, still used by the google/ddpm-* `.bin` files; diffusers
/// renames them on load, and so do we). The weights of `q`, `k`, `v` and `proj_out` are
/// `Linear` `(c, c)` in diffusers and reshaped to our 1x1 convolutions `(c, c, 1, 1)`.
pub const ATTENTION_RULES: [(&str, &str, &str); 5] = [
    ("norm", "group_norm", "group_norm"),
    ("q", "to_q", "query"),
    ("k", "to_k", "key"),
    ("v", "to_v", "value"),
    ("proj_out", "to_out.0", "proj_attn"),
];

/// Where one of our tensors is in a diffusers state dict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffusersName {
    /// Its name in diffusers' current naming.
    pub name: String,
    /// Its name in the naming of diffusers' first releases, when that differs.
    pub legacy: Option<String>,
    /// Whether diffusers stores it as a `Linear` weight `(out, in)` where ours is a 1x1
    /// convolution `(out, in, 1, 1)`.
    pub linear_as_conv: bool,
}

/// The diffusers name of our tensor `ours` in a model of `levels` levels (by [`NAME_RULES`]);
/// `None` for a name no rule covers.
pub fn diffusers_name(ours: &str, levels: usize) -> Option<DiffusersName> {
    let segments: Vec<&str> = ours.split('.').collect();
    NAME_RULES
        .iter()
        .find_map(|(from, to)| apply_rule(from, to, &segments, levels))
}

/// Our name of each diffusers tensor of `levels` levels, for reports: the inverse of
/// [`diffusers_name`] over the names of `ours`.
pub fn name_table<'a>(
    ours: impl IntoIterator<Item = &'a str>,
    levels: usize,
) -> Vec<(String, Option<DiffusersName>)> {
    ours.into_iter()
        .map(|n| (n.to_string(), diffusers_name(n, levels)))
        .collect()
}

fn apply_rule(from: &str, to: &str, name: &[&str], levels: usize) -> Option<DiffusersName> {
    let pattern: Vec<&str> = from.split('.').collect();
    let (mut i, mut j) = (None, None);
    let mut k = 0;
    let mut tail: Option<(String, Option<String>, bool)> = None;
    for p in &pattern {
        match *p {
            "{i}" | "{j}" => {
                let v: usize = name.get(k)?.parse().ok()?;
                if *p == "{i}" {
                    i = Some(v);
                } else {
                    j = Some(v);
                }
                k += 1;
            }
            "*" => {
                let param = *name.get(k)?;
                if k + 1 != name.len() || !matches!(param, "weight" | "bias") {
                    return None;
                }
                tail = Some((param.to_string(), None, false));
                k += 1;
            }
            "<resnet>" => {
                let (layer, param) = (*name.get(k)?, *name.get(k + 1)?);
                if k + 2 != name.len() || !matches!(param, "weight" | "bias") {
                    return None;
                }
                let (_, theirs) = RESNET_RULES.iter().find(|(o, _)| *o == layer)?;
                tail = Some((format!("{theirs}.{param}"), None, false));
                k += 2;
            }
            "<attn>" => {
                let (layer, param) = (*name.get(k)?, *name.get(k + 1)?);
                if k + 2 != name.len() || !matches!(param, "weight" | "bias") {
                    return None;
                }
                let (_, theirs, old) = ATTENTION_RULES.iter().find(|(o, _, _)| *o == layer)?;
                let legacy = (theirs != old).then(|| format!("{old}.{param}"));
                let linear = layer != "norm" && param == "weight";
                tail = Some((format!("{theirs}.{param}"), legacy, linear));
                k += 2;
            }
            literal => {
                if name.get(k) != Some(&literal) {
                    return None;
                }
                k += 1;
            }
        }
    }
    if k != name.len() {
        return None;
    }
    let (rest, legacy_rest, linear_as_conv) = tail?;
    let render = |rest: &str| -> Option<String> {
        let mut out = Vec::new();
        for p in to.split('.') {
            out.push(match p {
                "{i}" => i?.to_string(),
                "{j}" => j?.to_string(),
                "{n-1-i}" => levels.checked_sub(1)?.checked_sub(i?)?.to_string(),
                "*" | "<resnet>" | "<attn>" => rest.to_string(),
                literal => literal.to_string(),
            });
        }
        Some(out.join("."))
    };
    Some(DiffusersName {
        name: render(&rest)?,
        legacy: match legacy_rest {
            Some(l) => Some(render(&l)?),
            None => None,
        },
        linear_as_conv,
    })
}

/// A diffusers `UNet2DModel` config read into ours.
#[derive(Debug, Clone, PartialEq)]
pub struct DiffusersUnetConfig {
    /// The equivalent [`DdpmUnet`](crate::DdpmUnet) config (validated).
    pub config: DdpmUnetConfig,
    /// Things worth telling the user about how the file was read: keys diffusers does not know
    /// (ignored, as diffusers ignores them) and an absent `attention_head_dim`.
    pub notes: Vec<String>,
}

/// The `UNet2DModel` keys this crate reads, with the values it supports (documentation of
/// [`unet_config_from_json`]; diffusers' default applies to an absent key).
pub const KNOWN_UNET_KEYS: [&str; 28] = [
    "sample_size",
    "in_channels",
    "out_channels",
    "center_input_sample",
    "time_embedding_type",
    "time_embedding_dim",
    "freq_shift",
    "flip_sin_to_cos",
    "down_block_types",
    "mid_block_type",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "mid_block_scale_factor",
    "downsample_padding",
    "downsample_type",
    "upsample_type",
    "dropout",
    "act_fn",
    "attention_head_dim",
    "norm_num_groups",
    "attn_norm_num_groups",
    "norm_eps",
    "resnet_time_scale_shift",
    "add_attention",
    "class_embed_type",
    "num_class_embeds",
    "num_train_timesteps",
];

/// The config of one model file, with the path for errors.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn refuse(&self, field: &str, value: &Value, reason: impl Into<String>) -> UnetError {
        UnetError::DiffusersConfig {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// The value of `key`, or `default` (diffusers' default) when absent.
    fn get(&self, key: &str, default: Value) -> Value {
        self.map.get(key).cloned().unwrap_or(default)
    }

    fn usize(&self, key: &str, default: Option<usize>) -> Result<usize, UnetError> {
        let v = self.get(key, default.map_or(Value::Null, Value::from));
        match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
            Some(n) => Ok(n),
            None if v.is_null() => Err(self.refuse(key, &v, "required: the model needs it")),
            None => Err(self.refuse(key, &v, "must be a non-negative integer")),
        }
    }

    fn f64(&self, key: &str, default: f64) -> Result<f64, UnetError> {
        let v = self.get(key, Value::from(default));
        v.as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| self.refuse(key, &v, "must be a finite number"))
    }

    /// Requires `key` (or its default) to be one of `allowed`.
    fn require(
        &self,
        key: &str,
        default: Value,
        allowed: &[Value],
        why: &str,
    ) -> Result<Value, UnetError> {
        let v = self.get(key, default);
        if allowed.contains(&v) {
            Ok(v)
        } else {
            let absent = if self.map.contains_key(key) {
                ""
            } else {
                " (absent: diffusers' default)"
            };
            Err(self.refuse(key, &v, format!("{why}{absent}")))
        }
    }

    fn strings(&self, key: &str, default: &[&str]) -> Result<Vec<String>, UnetError> {
        let v = self.get(key, Value::from(default.to_vec()));
        let list = v
            .as_array()
            .ok_or_else(|| self.refuse(key, &v, "must be a list of block type names"))?;
        list.iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.refuse(key, &v, "must be a list of block type names"))
            })
            .collect()
    }
}

/// The names of diffusers' down blocks we build, and whether each has attention.
const DOWN_BLOCKS: [(&str, bool); 2] = [("DownBlock2D", false), ("AttnDownBlock2D", true)];
/// The names of diffusers' up blocks we build, and whether each has attention.
const UP_BLOCKS: [(&str, bool); 2] = [("UpBlock2D", false), ("AttnUpBlock2D", true)];

/// Reads a diffusers `UNet2DModel` `config.json` (its text; `path` names it in errors) into a
/// [`DdpmUnetConfig`]. Every setting is checked: a value our [`DdpmUnet`](crate::DdpmUnet) cannot reproduce is
/// an error naming the field and its value.
pub fn unet_config_from_json(text: &str, path: &Path) -> Result<DiffusersUnetConfig, UnetError> {
    let root: Value = serde_json::from_str(text).map_err(|e| UnetError::DiffusersConfig {
        path: path.to_path_buf(),
        field: "(file)".into(),
        value: "-".into(),
        reason: format!("not valid JSON: {e}"),
    })?;
    let map = root.as_object().ok_or_else(|| UnetError::DiffusersConfig {
        path: path.to_path_buf(),
        field: "(file)".into(),
        value: "-".into(),
        reason: "not a JSON object".into(),
    })?;
    let f = Fields { map, path };
    let mut notes = Vec::new();

    if let Some(class) = map.get("_class_name") {
        if class != "UNet2DModel" {
            return Err(f.refuse(
                "_class_name",
                class,
                "only diffusers' UNet2DModel (the DDPM pipelines' network) can be loaded",
            ));
        }
    }
    let mut unknown: Vec<&String> = map
        .keys()
        .filter(|k| !k.starts_with('_') && !KNOWN_UNET_KEYS.contains(&k.as_str()))
        .collect();
    unknown.sort();
    if !unknown.is_empty() {
        notes.push(format!(
            "{}: ignored keys that UNet2DModel does not take (diffusers ignores them too): {}",
            path.display(),
            unknown
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }

    // Settings that must have the DDPM paper's value.
    let t = Value::from(true);
    let no = Value::from(false);
    f.require(
        "center_input_sample",
        no.clone(),
        &[Value::Bool(false)],
        "inputs are not re-centred by our model: only false is supported",
    )?;
    f.require(
        "time_embedding_type",
        "positional".into(),
        &["positional".into()],
        "only the sinusoidal (\"positional\") time embedding is supported",
    )?;
    // The settings diffusers changed from the paper: read into the config (its own defaults
    // when absent, as diffusers reads them).
    let flip_sin_to_cos = match f.get("flip_sin_to_cos", t.clone()) {
        Value::Bool(b) => b,
        v => return Err(f.refuse("flip_sin_to_cos", &v, "must be true or false")),
    };
    let freq_shift = f.f64("freq_shift", 0.0)?;
    let downsample_padding = match f.get("downsample_padding", 1.into()).as_u64() {
        Some(p @ (0 | 1)) => p as usize,
        _ => {
            return Err(f.refuse(
                "downsample_padding",
                &f.get("downsample_padding", 1.into()),
                "our downsampling pads by 0 (one row and column at the bottom and right) or 1",
            ))
        }
    };
    f.require(
        "downsample_type",
        "conv".into(),
        &["conv".into()],
        "only strided-convolution downsampling is supported",
    )?;
    f.require(
        "upsample_type",
        "conv".into(),
        &["conv".into()],
        "only nearest upsampling followed by a convolution is supported",
    )?;
    f.require(
        "act_fn",
        "silu".into(),
        &["silu".into(), "swish".into()],
        "only the SiLU activation is supported",
    )?;
    f.require(
        "resnet_time_scale_shift",
        "default".into(),
        &["default".into()],
        "only additive time conditioning (\"default\") is supported",
    )?;
    f.require(
        "add_attention",
        t.clone(),
        &[Value::Bool(true)],
        "our middle block always has attention",
    )?;
    f.require(
        "mid_block_type",
        "UNetMidBlock2D".into(),
        &["UNetMidBlock2D".into()],
        "our middle block is UNetMidBlock2D",
    )?;
    f.require(
        "class_embed_type",
        Value::Null,
        &[Value::Null],
        "class conditioning is not supported",
    )?;
    // A class table of k rows is read as k - 1 classes and the null label k - 1: the layout of
    // our own exports (the last row is the unconditional model of classifier-free guidance).
    let num_classes = match f.get("num_class_embeds", Value::Null) {
        Value::Null => None,
        v => match v.as_u64().and_then(|k| usize::try_from(k).ok()) {
            Some(k) if k >= 2 => {
                notes.push(format!(
                    "{}: num_class_embeds = {k}: read as {} classes (labels 0..{}) and the null \
                     label {} of classifier-free guidance, the layout ddpm-rs exports",
                    path.display(),
                    k - 1,
                    k - 2,
                    k - 1
                ));
                Some(k - 1)
            }
            _ => {
                return Err(f.refuse(
                    "num_class_embeds",
                    &v,
                    "must be an integer >= 2 (the classes and a null label) or null",
                ))
            }
        },
    };
    f.require(
        "mid_block_scale_factor",
        1.into(),
        &[1.into(), Value::from(1.0)],
        "the middle block's output is not rescaled in our model",
    )?;
    let norm_eps = f.f64("norm_eps", 1e-5)?;

    let block_out = f.get("block_out_channels", Value::from(vec![224, 448, 672, 896]));
    let channels: Vec<usize> = block_out
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|v| v.as_u64().and_then(|n| usize::try_from(n).ok()))
                .collect()
        })
        .filter(|c: &Vec<usize>| !c.is_empty() && !c.contains(&0))
        .ok_or_else(|| {
            f.refuse(
                "block_out_channels",
                &block_out,
                "must be a non-empty list of positive integers",
            )
        })?;
    let ch = channels[0];
    if let Some(c) = channels.iter().find(|c| *c % ch != 0) {
        return Err(f.refuse(
            "block_out_channels",
            &block_out,
            format!("{c} is not a multiple of the first level's {ch}: our levels have ch * ch_mult[i] channels"),
        ));
    }
    let n = channels.len();
    let down = f.strings(
        "down_block_types",
        &[
            "DownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
        ],
    )?;
    let up = f.strings(
        "up_block_types",
        &[
            "AttnUpBlock2D",
            "AttnUpBlock2D",
            "AttnUpBlock2D",
            "UpBlock2D",
        ],
    )?;
    for (key, list) in [("down_block_types", &down), ("up_block_types", &up)] {
        if list.len() != n {
            return Err(f.refuse(
                key,
                &Value::from(list.clone()),
                format!("has {} entries but block_out_channels has {n}", list.len()),
            ));
        }
    }
    let mut with_attn = Vec::with_capacity(n);
    for (i, name) in down.iter().enumerate() {
        let attn = DOWN_BLOCKS
            .iter()
            .find(|(b, _)| b == name)
            .map(|(_, a)| *a)
            .ok_or_else(|| {
                f.refuse(
                    &format!("down_block_types[{i}]"),
                    &Value::from(name.as_str()),
                    "only DownBlock2D and AttnDownBlock2D are supported",
                )
            })?;
        with_attn.push(attn);
    }
    for (k, name) in up.iter().enumerate() {
        let attn = UP_BLOCKS
            .iter()
            .find(|(b, _)| b == name)
            .map(|(_, a)| *a)
            .ok_or_else(|| {
                f.refuse(
                    &format!("up_block_types[{k}]"),
                    &Value::from(name.as_str()),
                    "only UpBlock2D and AttnUpBlock2D are supported",
                )
            })?;
        let level = n - 1 - k;
        if attn != with_attn[level] {
            return Err(f.refuse(
                &format!("up_block_types[{k}]"),
                &Value::from(name.as_str()),
                format!(
                    "does not mirror down_block_types[{level}] = \"{}\": our model has attention at \
                     the same levels on the way down and up",
                    down[level]
                ),
            ));
        }
    }

    let groups = f.usize("norm_num_groups", Some(32))?;
    let attn_groups = f.get("attn_norm_num_groups", Value::Null);
    if !attn_groups.is_null() && attn_groups.as_u64() != Some(groups as u64) {
        return Err(f.refuse(
            "attn_norm_num_groups",
            &attn_groups,
            format!("our attention blocks normalize in norm_num_groups = {groups} groups"),
        ));
    }
    let temb_dim = f.get("time_embedding_dim", Value::Null);
    if !temb_dim.is_null() && temb_dim.as_u64() != Some(4 * ch as u64) {
        return Err(f.refuse(
            "time_embedding_dim",
            &temb_dim,
            format!(
                "our time embedding has 4 * block_out_channels[0] = {} features",
                4 * ch
            ),
        ));
    }
    let attention_head_dim = match map.get("attention_head_dim") {
        None => {
            notes.push(format!(
                "{}: no `attention_head_dim`: read as single-head attention (the DDPM paper's \
                 model, and diffusers' until it defaulted to 8-channel heads)",
                path.display()
            ));
            None
        }
        Some(Value::Null) => None,
        Some(v) => match v.as_u64().and_then(|d| usize::try_from(d).ok()) {
            Some(d) if d > 0 => Some(d),
            _ => {
                return Err(f.refuse(
                    "attention_head_dim",
                    v,
                    "must be a positive integer (features per head) or null (one head)",
                ))
            }
        },
    };
    let dropout = f.f64("dropout", 0.0)?;
    if !(0.0..1.0).contains(&dropout) {
        return Err(f.refuse("dropout", &Value::from(dropout), "must be in [0, 1)"));
    }

    let size_value = f.get("sample_size", Value::Null);
    let image_size = match &size_value {
        Value::Array(hw) if hw.len() == 2 && hw[0] == hw[1] => hw[0].as_u64(),
        Value::Array(_) => {
            return Err(f.refuse(
                "sample_size",
                &size_value,
                "only square images are supported",
            ))
        }
        v => v.as_u64(),
    }
    .and_then(|s| usize::try_from(s).ok())
    .filter(|s| *s > 0)
    .ok_or_else(|| f.refuse("sample_size", &size_value, "must be a positive image size"))?;
    let factor = u32::try_from(n - 1)
        .ok()
        .and_then(|h| 1usize.checked_shl(h))
        .filter(|f| *f > 0 && *f <= image_size);
    if factor.is_none_or(|f| image_size % f != 0) {
        return Err(f.refuse(
            "sample_size",
            &size_value,
            format!(
                "cannot be halved {} times by the {n} levels of block_out_channels",
                n - 1
            ),
        ));
    }

    let in_channels = f.usize("in_channels", Some(3))?;
    let out_channels = f.usize("out_channels", Some(3))?;
    let config = DdpmUnetConfig {
        image_size,
        in_channels,
        out_channels: (out_channels != in_channels).then_some(out_channels),
        ch,
        ch_mult: channels.iter().map(|c| c / ch).collect(),
        num_res_blocks: f.usize("layers_per_block", Some(2))?,
        attn_resolutions: (0..n)
            .filter(|i| with_attn[*i])
            .map(|i| image_size >> i)
            .collect(),
        dropout,
        groups,
        num_classes,
        // A head as wide as its block is one head: written so, the config reads as the
        // paper's.
        attention_head_dim: attention_head_dim.filter(|d| {
            let widths = (0..n).filter(|&i| with_attn[i]).map(|i| channels[i]);
            widths.chain([channels[n - 1]]).any(|w| w != *d)
        }),
        norm_eps,
        flip_sin_to_cos,
        freq_shift,
        downsample_padding,
    };
    config.validate().map_err(|e| match e {
        UnetError::InvalidConfig { field, reason } => {
            let theirs = match field {
                "groups" => "norm_num_groups",
                "ch_mult" | "ch" => "block_out_channels",
                "image_size" => "sample_size",
                "num_res_blocks" => "layers_per_block",
                "attn_resolutions" => "down_block_types",
                other => other,
            };
            f.refuse(theirs, &f.get(theirs, Value::Null), reason)
        }
        other => other,
    })?;
    Ok(DiffusersUnetConfig { config, notes })
}

/// Reads a diffusers `UNet2DModel` `config.json` file, see [`unet_config_from_json`].
pub fn read_unet_config(path: &Path) -> Result<DiffusersUnetConfig, UnetError> {
    let text = ddpm_fs::read_regular_text(path).map_err(|e| UnetError::DiffusersConfig {
        path: path.to_path_buf(),
        field: "(file)".into(),
        value: "-".into(),
        reason: format!("cannot read: {e}"),
    })?;
    unet_config_from_json(&text, path)
}

/// Reads the tensors of a diffusers weights file: safetensors, or a PyTorch pickle (`.bin`,
/// `.pt`, `.pth`, `.ckpt`), on the CPU.
pub fn read_weights(path: &Path) -> Result<HashMap<String, Tensor>, UnetError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if ext.as_deref() == Some("safetensors") {
        return Ok(read_safetensors(path, &Device::Cpu)?.tensors);
    }
    let err = |reason: String| UnetError::Weights {
        path: path.to_path_buf(),
        reason,
    };
    ddpm_fs::check_regular_file(path).map_err(|e| err(e.to_string()))?;
    let pairs = candle_core::pickle::read_all(path).map_err(|e| {
        err(format!(
            "not a PyTorch state dict this program can read: {e}"
        ))
    })?;
    let mut out = HashMap::with_capacity(pairs.len());
    for (name, tensor) in pairs {
        if out.insert(name.clone(), tensor).is_some() {
            return Err(err(format!("holds tensor `{name}` twice")));
        }
    }
    Ok(out)
}

/// Renames diffusers `tensors` (from `path`, named in errors) onto our `vars` of a model of
/// `levels` levels, reshaping the attention projections; strict: a tensor of ours missing from
/// the file, a tensor of the file no rule uses, a shape that differs or a NaN or infinite value
/// is an error naming the tensor by its diffusers name.
pub fn map_tensors(
    tensors: &HashMap<String, Tensor>,
    vars: &BTreeMap<String, Var>,
    levels: usize,
    path: &Path,
) -> Result<HashMap<String, Tensor>, UnetError> {
    let mut used = HashSet::new();
    let mut out = HashMap::with_capacity(vars.len());
    for (ours, var) in vars {
        let d = diffusers_name(ours, levels).ok_or_else(|| UnetError::Weights {
            path: path.to_path_buf(),
            reason: format!("no diffusers name for our tensor `{ours}` (a bug of the mapping)"),
        })?;
        let dims = var.dims().to_vec();
        let theirs_dims = if d.linear_as_conv {
            dims[..2].to_vec()
        } else {
            dims.clone()
        };
        let (name, t) = match (
            tensors.get(&d.name),
            d.legacy
                .as_ref()
                .and_then(|l| tensors.get(l).map(|t| (l, t))),
        ) {
            (Some(t), _) => (&d.name, t),
            (None, Some((l, t))) => (l, t),
            (None, None) => {
                return Err(UnetError::MissingTensor {
                    path: path.to_path_buf(),
                    name: d.name,
                    expected: theirs_dims,
                })
            }
        };
        let ok =
            t.dims() == theirs_dims.as_slice() || (d.linear_as_conv && t.dims() == dims.as_slice());
        if !ok {
            return Err(UnetError::ShapeMismatch {
                path: path.to_path_buf(),
                name: name.clone(),
                expected: theirs_dims,
                found: t.dims().to_vec(),
            });
        }
        if !t.dtype().is_float() {
            return Err(UnetError::NotFloat {
                path: path.to_path_buf(),
                name: name.clone(),
                found: t.dtype(),
            });
        }
        // A NaN or infinity anywhere makes the sum of squares (in f64) non-finite.
        let energy = t
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
        if !energy.is_finite() {
            return Err(UnetError::Weights {
                path: path.to_path_buf(),
                reason: format!("tensor `{name}` holds NaN or infinite values"),
            });
        }
        used.insert(name.clone());
        out.insert(ours.clone(), t.reshape(dims)?);
    }
    let mut extra: Vec<&String> = tensors.keys().filter(|k| !used.contains(*k)).collect();
    extra.sort();
    if let Some(name) = extra.first() {
        return Err(UnetError::UnexpectedTensor {
            path: path.to_path_buf(),
            name: (*name).clone(),
        });
    }
    Ok(out)
}

/// The files of a diffusers UNet: its config and weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnetFiles {
    /// The `config.json`.
    pub config: PathBuf,
    /// The weights file (safetensors preferred to `.bin`, as diffusers does; an fp16 variant
    /// only when there is no other, [`FP16_VARIANT_FILES`]).
    pub weights: PathBuf,
}

/// Finds the UNet of `dir`: a pipeline directory (its `unet/` folder, as the google/ddpm-*
/// repositories lay it out) or a model folder with `config.json` and weights at the top.
pub fn find_unet_files(dir: &Path) -> Result<UnetFiles, UnetError> {
    let not_found = |reason: String| UnetError::DiffusersConfig {
        path: dir.to_path_buf(),
        field: "(directory)".into(),
        value: "-".into(),
        reason,
    };
    if !dir.is_dir() {
        return Err(not_found("not a directory".into()));
    }
    let sub = dir.join(UNET_SUBFOLDER);
    // `exists`, not `is_file`: a config that is not a regular file (a FIFO) is found here and
    // refused by name when it is read.
    let base = if sub.join(CONFIG_FILE).exists() {
        sub
    } else if dir.join(CONFIG_FILE).exists() {
        dir.to_path_buf()
    } else {
        return Err(not_found(format!(
            "no {UNET_SUBFOLDER}/{CONFIG_FILE} nor {CONFIG_FILE}: not a diffusers pipeline or \
             model directory"
        )));
    };
    let weights = WEIGHTS_FILES
        .iter()
        .chain(&FP16_VARIANT_FILES)
        .map(|w| base.join(w))
        .find(|p| p.exists())
        .ok_or_else(|| {
            let sharded = base
                .join("diffusion_pytorch_model.safetensors.index.json")
                .is_file();
            not_found(format!(
                "{} has no {} (nor their fp16 variants){}",
                base.display(),
                WEIGHTS_FILES.join(" nor "),
                if sharded {
                    " (sharded weights are not supported)"
                } else {
                    ""
                }
            ))
        })?;
    Ok(UnetFiles {
        config: base.join(CONFIG_FILE),
        weights,
    })
}

/// A diffusers UNet loaded as our model.
#[derive(Debug)]
pub struct LoadedUnet {
    /// The model with the file's weights.
    pub model: DiffusionModel,
    /// How the config was read.
    pub config: DiffusersUnetConfig,
    /// The files it came from.
    pub files: UnetFiles,
}

/// Loads the UNet of a diffusers pipeline or model directory (see [`find_unet_files`]) as a
/// [`DdpmUnet`](crate::DdpmUnet) on `device` in `dtype`.
pub fn load_unet_dir(dir: &Path, device: &Device, dtype: DType) -> Result<LoadedUnet, UnetError> {
    let files = find_unet_files(dir)?;
    let config = read_unet_config(&files.config)?;
    let model = load_unet_weights(&config.config, &files.weights, device, dtype)?;
    Ok(LoadedUnet {
        model,
        config,
        files,
    })
}

/// A [`DdpmUnet`](crate::DdpmUnet) of `config` with the weights of the diffusers file `weights` (see
/// [`read_weights`] and [`map_tensors`]).
pub fn load_unet_weights(
    config: &DdpmUnetConfig,
    weights: &Path,
    device: &Device,
    dtype: DType,
) -> Result<DiffusionModel, UnetError> {
    let tensors = read_weights(weights)?;
    // A config claiming more parameters than the file holds (a hand-edited `in_channels` or
    // `layers_per_block`) is refused before a model of its size is allocated.
    let config_model = ModelConfig::DdpmUnet(config.clone());
    config.validate()?;
    let claimed = crate::flops::forward_flops(&config_model).weights;
    let held: u64 = tensors.values().map(|t| t.elem_count() as u64).sum();
    if claimed > held {
        return Err(UnetError::Weights {
            path: weights.to_path_buf(),
            reason: format!(
                "the UNet's config.json describes a model of at least {claimed} parameters but \
                 this file holds {held} values: the config and the weights do not belong together"
            ),
        });
    }
    let model = DiffusionModel::new(&config_model, 0, device, dtype)?;
    let vars = model.vars();
    let mapped = map_tensors(&tensors, &vars, config.ch_mult.len(), weights)?;
    model.set_tensors(&mapped, weights)?;
    Ok(model)
}

/// The `_diffusers_version` written into exported configs: the diffusers release the export was
/// checked against (`bench/parity/diffusers_export.py`).
pub const EXPORT_DIFFUSERS_VERSION: &str = "0.42.1";

/// diffusers' `UNet2DModel` `config.json` for our `config`: the inverse of
/// [`unet_config_from_json`], which reads it back into `config` (every key is written, so no
/// diffusers default is relied on; `attention_head_dim` is null, diffusers' single-head
/// attention). A config diffusers cannot express is refused naming the field.
pub fn unet_config_to_json(config: &DdpmUnetConfig) -> Result<Value, UnetError> {
    config.validate()?;
    let n = config.ch_mult.len();
    let sizes: Vec<usize> = (0..n).map(|i| config.image_size >> i).collect();
    if let Some(r) = config.attn_resolutions.iter().find(|r| !sizes.contains(r)) {
        return Err(UnetError::InvalidConfig {
            field: "attn_resolutions",
            reason: format!(
                "{r} is not the size of a level ({sizes:?}): diffusers puts attention at whole \
                 levels only"
            ),
        });
    }
    let attn: Vec<bool> = sizes
        .iter()
        .map(|s| config.attn_resolutions.contains(s))
        .collect();
    let down: Vec<&str> = attn
        .iter()
        .map(|a| if *a { "AttnDownBlock2D" } else { "DownBlock2D" })
        .collect();
    let up: Vec<&str> = attn
        .iter()
        .rev()
        .map(|a| if *a { "AttnUpBlock2D" } else { "UpBlock2D" })
        .collect();
    let channels: Vec<usize> = config.ch_mult.iter().map(|m| m * config.ch).collect();
    Ok(serde_json::json!({
        "_class_name": "UNet2DModel",
        "_diffusers_version": EXPORT_DIFFUSERS_VERSION,
        "act_fn": "silu",
        "add_attention": true,
        "attention_head_dim": config.attention_head_dim,
        "attn_norm_num_groups": null,
        "block_out_channels": channels,
        "center_input_sample": false,
        "class_embed_type": null,
        "down_block_types": down,
        "downsample_padding": config.downsample_padding,
        "downsample_type": "conv",
        "dropout": config.dropout,
        "flip_sin_to_cos": config.flip_sin_to_cos,
        // An integer where it is one, as diffusers writes it.
        "freq_shift": if config.freq_shift.fract() == 0.0 {
            serde_json::json!(config.freq_shift as i64)
        } else {
            serde_json::json!(config.freq_shift)
        },
        "in_channels": config.in_channels,
        "layers_per_block": config.num_res_blocks,
        "mid_block_scale_factor": 1,
        "norm_eps": config.norm_eps,
        "norm_num_groups": config.groups,
        "num_class_embeds": config.num_classes.map(|n| n + 1),
        "num_train_timesteps": null,
        "out_channels": config.out_channels.unwrap_or(config.in_channels),
        "resnet_time_scale_shift": "default",
        "sample_size": config.image_size,
        "time_embedding_dim": null,
        "time_embedding_type": "positional",
        "up_block_types": up,
        "upsample_type": "conv",
    }))
}

/// Our tensors (a [`DdpmUnet`](crate::DdpmUnet) of `levels` levels, by our names) under
/// diffusers' current names, the attention projections reshaped to `Linear` weights `(c, c)`:
/// the inverse of [`map_tensors`], by the same rules ([`diffusers_name`]). A name no rule covers
/// is an error naming it.
pub fn export_tensors(
    ours: &BTreeMap<String, Tensor>,
    levels: usize,
) -> Result<BTreeMap<String, Tensor>, UnetError> {
    let mut out = BTreeMap::new();
    for (name, t) in ours {
        let d = diffusers_name(name, levels).ok_or_else(|| UnetError::Weights {
            path: "<export>".into(),
            reason: format!("no diffusers name for our tensor `{name}`: not a DdpmUnet tensor"),
        })?;
        let t = if d.linear_as_conv {
            let dims = t.dims();
            if dims.len() != 4 || dims[2] != 1 || dims[3] != 1 {
                return Err(UnetError::Weights {
                    path: "<export>".into(),
                    reason: format!(
                        "tensor `{name}` has shape {dims:?}, not a 1x1 convolution (c, c, 1, 1)"
                    ),
                });
            }
            t.reshape((dims[0], dims[1]))?
        } else {
            t.clone()
        };
        if out.insert(d.name.clone(), t).is_some() {
            return Err(UnetError::Weights {
                path: "<export>".into(),
                reason: format!(
                    "two of our tensors map to `{}` (a bug of the mapping)",
                    d.name
                ),
            });
        }
    }
    Ok(out)
}

/// Writes `model`'s network as a diffusers `UNet2DModel` folder: `dir/config.json`
/// ([`unet_config_to_json`]) and `dir/diffusion_pytorch_model.safetensors` ([`export_tensors`],
/// in `float32`, with diffusers' `format: pt` metadata), each written atomically. Only a
/// [`DdpmUnet`](crate::DdpmUnet) can be written: diffusers has no class for the lucidrains
/// [`Unet`](crate::Unet), which is refused.
pub fn save_unet_dir(model: &DiffusionModel, dir: &Path) -> Result<UnetFiles, UnetError> {
    let config = match model.config() {
        ModelConfig::DdpmUnet(c) => c,
        ModelConfig::Unet(_) => {
            return Err(UnetError::InvalidConfig {
                field: "arch",
                reason: "the lucidrains-style `unet` model has no diffusers class (diffusers' \
                         UNet2DModel is the DDPM paper's network, our `ddpm_unet`): only \
                         `ddpm_unet` models can be exported"
                    .into(),
            })
        }
    };
    let json = unet_config_to_json(config)?;
    let tensors = model
        .tensors()
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect::<Result<BTreeMap<_, _>, candle_core::Error>>()?;
    let renamed = export_tensors(&tensors, config.ch_mult.len())?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = crate::weights::to_safetensors_bytes(&renamed, metadata)?;
    let files = UnetFiles {
        config: dir.join(CONFIG_FILE),
        weights: dir.join(WEIGHTS_FILES[0]),
    };
    let write = |path: &Path, bytes: &[u8]| {
        std::fs::create_dir_all(dir)
            .and_then(|()| ddpm_fs::write_atomic(path, bytes))
            .map_err(|e| UnetError::Weights {
                path: path.to_path_buf(),
                reason: format!("cannot write: {e}"),
            })
    };
    let mut text = serde_json::to_string_pretty(&json).map_err(|e| UnetError::Weights {
        path: files.config.clone(),
        reason: e.to_string(),
    })?;
    text.push('\n');
    write(&files.config, text.as_bytes())?;
    write(&files.weights, &bytes)?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rules() {
        let n = |s: &str| diffusers_name(s, 4).map(|d| (d.name, d.legacy, d.linear_as_conv));
        assert_eq!(
            n("down.1.block.0.temb_proj.weight"),
            Some((
                "down_blocks.1.resnets.0.time_emb_proj.weight".into(),
                None,
                false
            ))
        );
        assert_eq!(
            n("up.3.block.2.nin_shortcut.bias"),
            Some((
                "up_blocks.0.resnets.2.conv_shortcut.bias".into(),
                None,
                false
            ))
        );
        assert_eq!(
            n("up.1.attn.2.q.weight"),
            Some((
                "up_blocks.2.attentions.2.to_q.weight".into(),
                Some("up_blocks.2.attentions.2.query.weight".into()),
                true
            ))
        );
        assert_eq!(
            n("mid.attn_1.proj_out.bias"),
            Some((
                "mid_block.attentions.0.to_out.0.bias".into(),
                Some("mid_block.attentions.0.proj_attn.bias".into()),
                false
            ))
        );
        assert_eq!(
            n("mid.attn_1.norm.weight"),
            Some((
                "mid_block.attentions.0.group_norm.weight".into(),
                None,
                false
            ))
        );
        assert_eq!(
            n("up.1.upsample.conv.weight"),
            Some(("up_blocks.2.upsamplers.0.conv.weight".into(), None, false))
        );
        assert_eq!(
            n("temb.dense.1.bias"),
            Some(("time_embedding.linear_2.bias".into(), None, false))
        );
        assert_eq!(
            n("norm_out.weight"),
            Some(("conv_norm_out.weight".into(), None, false))
        );
        for bad in [
            "down.x.block.0.conv1.weight",
            "up.4.block.0.conv1.weight",
            "conv_in",
            "mid.block_1.q.weight",
            "temb.dense.0.weight.x",
        ] {
            assert_eq!(n(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_tensor_of_the_cifar10_preset_has_a_distinct_diffusers_name() -> Result<(), UnetError> {
        let model = DiffusionModel::new(
            &ModelConfig::preset("cifar10")?,
            0,
            &Device::Cpu,
            DType::F32,
        )?;
        let vars = model.vars();
        let names: HashSet<String> = vars
            .keys()
            .map(|k| diffusers_name(k, 4).map(|d| d.name).ok_or(k.clone()))
            .collect::<Result<_, _>>()
            .map_err(|k| UnetError::Weights {
                path: k.into(),
                reason: "no name".into(),
            })?;
        assert_eq!(names.len(), vars.len());
        assert_eq!(vars.len(), 328);
        Ok(())
    }

    fn cifar10_config() -> &'static str {
        r#"{
          "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu",
          "block_out_channels": [128, 256, 256, 256], "center_input_sample": false,
          "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
          "downsample_padding": 0, "flip_sin_to_cos": false, "freq_shift": 1, "in_channels": 3,
          "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06,
          "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
          "time_embedding_type": "positional",
          "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
        }"#
    }

    #[test]
    fn the_ddpm_cifar10_config_is_our_cifar10_preset() -> Result<(), UnetError> {
        let read = unet_config_from_json(cifar10_config(), Path::new("config.json"))?;
        let want = DdpmUnetConfig {
            dropout: 0.0,
            ..DdpmUnetConfig::cifar10()
        };
        assert_eq!(read.config, want);
        // No attention_head_dim in this (diffusers 0.0.4) file: said so.
        assert_eq!(read.notes.len(), 1, "{:?}", read.notes);
        assert!(read.notes[0].contains("attention_head_dim"));
        Ok(())
    }

    #[test]
    fn unsupported_values_are_refused_naming_the_field() {
        let base: Value = serde_json::from_str(cifar10_config()).expect("json");
        let cases: [(&str, Value, &str); 14] = [
            (
                "time_embedding_type",
                "fourier".into(),
                "time_embedding_type",
            ),
            ("flip_sin_to_cos", "yes".into(), "flip_sin_to_cos"),
            ("freq_shift", 64.into(), "freq_shift"),
            ("freq_shift", (-1).into(), "freq_shift"),
            ("downsample_padding", 2.into(), "downsample_padding"),
            ("norm_eps", 0.into(), "norm_eps"),
            ("act_fn", "gelu".into(), "act_fn"),
            // 96 divides the attention level's 256 channels (2.67 heads) no more than 0 does.
            ("attention_head_dim", 96.into(), "attention_head_dim"),
            ("attention_head_dim", 0.into(), "attention_head_dim"),
            (
                "resnet_time_scale_shift",
                "scale_shift".into(),
                "resnet_time_scale_shift",
            ),
            ("num_class_embeds", 1.into(), "num_class_embeds"),
            (
                "down_block_types",
                serde_json::json!([
                    "DownBlock2D",
                    "SkipDownBlock2D",
                    "DownBlock2D",
                    "DownBlock2D"
                ]),
                "down_block_types[1]",
            ),
            (
                "up_block_types",
                serde_json::json!(["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),
                "up_block_types[1]",
            ),
            (
                "block_out_channels",
                serde_json::json!([128, 192, 256, 256]),
                "block_out_channels",
            ),
        ];
        for (key, value, field) in cases {
            let mut cfg = base.clone();
            cfg[key] = value.clone();
            let e = unet_config_from_json(&cfg.to_string(), Path::new("c.json")).expect_err(key);
            match &e {
                UnetError::DiffusersConfig { field: f, .. } => assert_eq!(f, field, "{e}"),
                other => panic!("{key}: {other}"),
            }
            let msg = e.to_string();
            assert!(msg.contains(field) && msg.contains("c.json"), "{msg}");
        }
        // An absent key takes diffusers' default, which may be refused too (an absent
        // act_fn is "silu", accepted; an absent time_embedding_type "positional").
        let mut cfg = base.clone();
        cfg.as_object_mut().expect("object").remove("act_fn");
        assert!(unet_config_from_json(&cfg.to_string(), Path::new("c.json")).is_ok());
        let mut cfg = base.clone();
        cfg["resnet_time_scale_shift"] = "scale_shift".into();
        cfg.as_object_mut()
            .expect("object")
            .remove("time_embedding_type");
        let e = unet_config_from_json(&cfg.to_string(), Path::new("c.json")).expect_err("shift");
        assert!(e.to_string().contains("resnet_time_scale_shift"), "{e}");
        // Unknown keys are ignored and noted.
        let mut cfg = base.clone();
        cfg["some_new_key"] = 1.into();
        let read = unet_config_from_json(&cfg.to_string(), Path::new("c.json")).expect("read");
        assert!(read.notes.iter().any(|n| n.contains("some_new_key")));
        // Garbage is an error, not a panic.
        for text in [
            "",
            "[]",
            "{\"sample_size\": -1}",
            "{\"block_out_channels\": []}",
            "{\"sample_size\": 1e300}",
        ] {
            assert!(
                unet_config_from_json(text, Path::new("c.json")).is_err(),
                "{text}"
            );
        }
    }
    #[test]
    fn an_exported_config_reads_back_as_the_same_model() -> Result<(), UnetError> {
        for preset in ["cifar-small", "cifar10", "mnist-small"] {
            let ModelConfig::DdpmUnet(config) = ModelConfig::preset(preset)? else {
                continue;
            };
            let json = unet_config_to_json(&config)?;
            let read = unet_config_from_json(&json.to_string(), Path::new("config.json"))?;
            assert_eq!(read.config, config, "{preset}");
            assert!(read.notes.is_empty(), "{preset}: {:?}", read.notes);
        }
        // An attention resolution that is no level's size cannot be said in diffusers' terms.
        let odd = DdpmUnetConfig {
            attn_resolutions: vec![12],
            ..DdpmUnetConfig::cifar10()
        };
        match unet_config_to_json(&odd) {
            Err(UnetError::InvalidConfig { field, .. }) => assert_eq!(field, "attn_resolutions"),
            other => panic!("{other:?}"),
        }
        Ok(())
    }

    /// A class-conditional model of 10 classes is diffusers' `num_class_embeds = 11` (the
    /// classes and the null label), read back as 10 classes with a note saying how.
    #[test]
    fn class_conditional_configs_round_trip() -> Result<(), UnetError> {
        let config = DdpmUnetConfig {
            num_classes: Some(10),
            ..DdpmUnetConfig::cifar_small()
        };
        let json = unet_config_to_json(&config)?;
        assert_eq!(json["num_class_embeds"], 11);
        assert!(json["class_embed_type"].is_null());
        let read = unet_config_from_json(&json.to_string(), Path::new("config.json"))?;
        assert_eq!(read.config, config);
        assert_eq!(read.notes.len(), 1, "{:?}", read.notes);
        assert!(read.notes[0].contains("10 classes"), "{:?}", read.notes);
        Ok(())
    }

    #[test]
    fn exported_tensors_map_back_to_ours_bit_for_bit() -> Result<(), UnetError> {
        let mut config = ModelConfig::preset("cifar-small")?;
        config.set_num_classes(Some(4));
        let model = DiffusionModel::new(&config, 7, &Device::Cpu, DType::F32)?;
        let ModelConfig::DdpmUnet(config) = model.config().clone() else {
            panic!("cifar-small is a DdpmUnet");
        };
        let levels = config.ch_mult.len();
        let ours = model.tensors();
        let theirs: HashMap<String, Tensor> = export_tensors(&ours, levels)?.into_iter().collect();
        assert_eq!(theirs.len(), ours.len());
        // The attention projections are Linear weights in diffusers' file.
        let q = theirs
            .get("mid_block.attentions.0.to_q.weight")
            .expect("mid attention");
        assert_eq!(q.dims().len(), 2);
        // The class table is diffusers' nn.Embedding(num_class_embeds, time_embed_dim).
        assert_eq!(theirs["class_embedding.weight"].dims(), &[5, 128]);
        let back = map_tensors(&theirs, &model.vars(), levels, Path::new("x"))?;
        for (name, t) in &ours {
            let a = t.flatten_all()?.to_vec1::<f32>()?;
            let b = back[name].flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(a, b, "{name}");
            assert_eq!(t.dims(), back[name].dims(), "{name}");
        }
        Ok(())
    }
}
