//! Text to token ids and back, through a Hugging Face `tokenizer.json`.

use std::path::Path;

use crate::error::{Error, Result};

/// A loaded `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Tokenizer { inner })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
    }
}

/// A byte-level tokenizer: one token per byte (GPT-2's byte-to-character map, no merges),
/// plus `<|endoftext|>` as id 256. Used by the built-in model.
pub fn byte_level_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> =
        bytes_to_unicode().iter().enumerate().map(|(b, c)| (c.to_string(), serde_json::Value::from(b))).collect();
    let byte_level =
        serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 256, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
    .to_string()
}

/// GPT-2's reversible map from bytes to printable characters (`bytes_to_unicode`).
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut next = 256;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_round_trips_any_text() {
        let path = std::env::temp_dir().join(format!("onehead-tok-{}.json", std::process::id()));
        std::fs::write(&path, byte_level_json()).unwrap();
        let tok = Tokenizer::from_file(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let text = "def héllo():\n\treturn '✓' # 🦀";
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids.len(), text.len(), "one token per byte");
        assert_eq!(ids[0], b'd' as u32);
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert_eq!(tok.decode(&[104, 105, 256]).unwrap(), "hi", "the special token is skipped");
    }
}
