//! Text: tokenizing prompts, turning streamed token ids into valid UTF-8 pieces, and matching
//! stop sequences on the text, across token boundaries.

use std::str::FromStr;

/// A Hugging Face tokenizer, from its `tokenizer.json`; or none, for a model folder without one
/// (a benchmark checkpoint, say): it then serves token-id prompts, and its completions carry ids
/// but no text.
pub struct Tokenizer {
    inner: Option<tokenizers::Tokenizer>,
}

/// A token of encoded text.
pub struct EncodedToken {
    pub id: u32,
    pub text: String,
    pub start: usize,
    pub end: usize,
}

impl Tokenizer {
    pub fn from_json(json: &str) -> Result<Self, String> {
        tokenizers::Tokenizer::from_str(json).map(|inner| Tokenizer { inner: Some(inner) }).map_err(|e| e.to_string())
    }

    /// No tokenizer: token ids only.
    pub fn none() -> Self {
        Tokenizer { inner: None }
    }

    /// Whether text can be encoded and decoded.
    pub fn has_text(&self) -> bool {
        self.inner.is_some()
    }

    pub fn encode(&self, text: &str) -> Result<Vec<EncodedToken>, String> {
        let Some(inner) = &self.inner else {
            return Err("the model has no tokenizer.json, so text cannot be tokenized: send token ids".into());
        };
        let encoding = inner.encode(text, false).map_err(|e| e.to_string())?;
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_offsets())
            .map(|(&id, &(start, end))| EncodedToken {
                id,
                text: text.get(start..end).unwrap_or_default().into(),
                start,
                end,
            })
            .collect())
    }

    /// The text of `ids`; empty without a tokenizer.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.as_ref().and_then(|t| t.decode(ids, true).ok()).unwrap_or_default()
    }
}

/// Incremental detokenization: each new token yields the text it completes. A token that ends
/// inside a multi-byte character yields nothing until the character is whole. Decoding a window
/// that starts a few tokens back (as Hugging Face TGI does) keeps the cost per token constant.
///
/// `tokenizers`' own `DecodeStream` (0.22) runs the same window and yields the same pieces, token
/// for token, on every case the tests try (byte-level emoji and CJK split across tokens, special
/// tokens skipped, invalid bytes, Llama-style byte fallback); it is not used because it has no
/// `finish`: a generation that ends inside a character, say the bytes `61 F0 9F A6` ("a" and
/// three of the four bytes of 🦀), gives "a" from `DecodeStream` but "a\u{FFFD}" from a full
/// `decode` of the ids, which this type's `finish` returns (`decode_stream_has_no_finish` below).
/// It would also fail the stream (`InvalidPrefix`) where this type waits for more tokens.
#[derive(Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the decoding window.
    prefix_offset: usize,
    /// Tokens up to here have been turned into text.
    read_offset: usize,
}

impl Detokenizer {
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let text = tokenizer.decode(&self.ids[self.prefix_offset..]);
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') && text.starts_with(&prefix) {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            text[prefix.len()..].to_owned()
        } else {
            String::new()
        }
    }

    /// What is left at the end (an incomplete character comes out as U+FFFD).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> String {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let text = tokenizer.decode(&self.ids[self.prefix_offset..]);
        self.read_offset = self.ids.len();
        self.prefix_offset = self.read_offset;
        text.strip_prefix(&prefix).unwrap_or_default().to_owned()
    }
}

/// Matches stop sequences on generated text. Text that could still become a stop sequence is
/// held back; the stop sequence itself is never released.
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    /// Bytes of `text` already released.
    released: usize,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops, text: String::new(), released: 0 }
    }

    /// Adds a piece; returns the text now safe to release, and whether a stop sequence ended
    /// the generation (then nothing after it is released).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        let search_from = self.released;
        self.text.push_str(piece);
        let found = self.stops.iter().filter_map(|s| self.text[search_from..].find(s.as_str())).min();
        if let Some(at) = found {
            let out = self.text[self.released..search_from + at].to_owned();
            self.released = self.text.len();
            return (out, true);
        }
        // Hold back the longest tail that is a prefix of some stop sequence.
        let held = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
            .filter(|prefix| self.text[self.released..].ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let end = self.text.len() - held;
        let out = self.text[self.released..end].to_owned();
        self.released = end;
        (out, false)
    }

    /// Releases what was held back, at the end.
    pub fn finish(&mut self) -> String {
        let out = self.text[self.released..].to_owned();
        self.released = self.text.len();
        out
    }
}

/// A byte-level BPE tokenizer with one token per byte (id = the byte, GPT-2's byte map) and no
/// merges, so that every multi-byte character is split across tokens; `<|endoftext|>` (256) is a
/// special token, `<sep>` (257) an added one that is not.
#[cfg(test)]
pub(crate) fn byte_level_tokenizer() -> Tokenizer {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut next = 256;
    let vocab: Vec<String> = (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            };
            format!("{:?}:{b}", c.to_string())
        })
        .collect();
    let added = |id: u32, content: &str, special: bool| {
        format!(
            r#"{{"id":{id},"content":"{content}","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":{special}}}"#
        )
    };
    let json = format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{},{}],"normalizer":null,
        "pre_tokenizer":{{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}},
        "post_processor":null,"decoder":{{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}},
        "model":{{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,"end_of_word_suffix":null,
        "fuse_unk":false,"byte_fallback":false,"ignore_merges":false,"vocab":{{{}}},"merges":[]}}}}"#,
        added(256, "<|endoftext|>", true),
        added(257, "<sep>", false),
        vocab.join(",")
    );
    Tokenizer::from_json(&json).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces`; returns the released text of each, and the index of the stopping piece.
    fn check(stops: &[&str], pieces: &[&str], expected: &[&str], stopped_at: Option<usize>) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            let (text, stopped) = m.push(piece);
            out.push(text);
            if stopped {
                assert_eq!(Some(i), stopped_at);
                assert_eq!(out, expected);
                return;
            }
        }
        out.push(m.finish());
        assert_eq!(stopped_at, None);
        assert_eq!(out, expected);
    }

    #[test]
    fn stop_sequences_match_across_pieces_and_are_not_returned() {
        check(&["\n\n"], &["a", "b\n", "\nc"], &["a", "b", ""], Some(2));
        check(&["END"], &["xE", "N", "Dy"], &["x", "", ""], Some(2));
        // A held prefix that does not complete is released.
        check(&["END"], &["xE", "Nd", "z"], &["x", "ENd", "z", ""], None);
        check(&["stop"], &["no stop", "here"], &["no "], Some(0));
        // The earliest of several.
        check(&["c", "ab"], &["xabc"], &["x"], Some(0));
        check(&[], &["a", "b"], &["a", "b", ""], None);
        // Multi-byte stop sequences hold back whole characters only.
        check(&["é!"], &["caf", "é", "!"], &["caf", "", ""], Some(2));
    }

    #[test]
    fn detokenized_pieces_are_whole_characters_and_add_up() {
        let tok = byte_level_tokenizer();
        let text = "héllo ✓ 🦀!";
        let ids: Vec<u32> = tok.encode(text).unwrap().iter().map(|t| t.id).collect();
        let mut d = Detokenizer::default();
        let pieces: Vec<String> = ids.iter().map(|&id| d.push(&tok, id)).collect();
        assert!(pieces.iter().any(String::is_empty), "multi-byte characters wait for their last byte");
        assert_eq!(pieces.concat() + &d.finish(&tok), text);
        assert_eq!(pieces.iter().filter(|p| !p.is_empty()).count(), text.chars().count());
    }

    /// Streams `ids` through a `Detokenizer`: the pieces it yields (`|` between them, the piece
    /// of `finish` after `||`) must be `expected`, and must add up to a full decode of the ids.
    fn check_detokenized(ids: &[u32], expected: &str) {
        let tok = byte_level_tokenizer();
        let mut d = Detokenizer::default();
        let pieces: Vec<String> = ids.iter().map(|&id| d.push(&tok, id)).collect();
        let rest = d.finish(&tok);
        assert_eq!(format!("{}||{rest}", pieces.join("|")), expected, "{ids:?}");
        assert_eq!(pieces.concat() + &rest, tok.decode(ids), "incremental == full decode for {ids:?}");
    }

    fn bytes(text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    #[test]
    fn incremental_detokenization_equals_a_full_decode() {
        check_detokenized(&bytes("ab"), "a|b||");
        check_detokenized(&bytes("日本"), "||日|||本||");
        check_detokenized(&bytes("a🦀b"), "a||||🦀|b||");
        // A special token is skipped, even inside a character; an added one that is not special is text.
        check_detokenized(&[0xF0, 0x9F, 256, 0xA6, 0x80, 0x41], "||||🦀|A||");
        check_detokenized(&[0x78, 0x20, 257, 0x20, 0x79], "x| |<sep>| |y||");
        check_detokenized(&[256, 256], "|||");
        // Bytes that can never become a character come out as U+FFFD once a valid one follows.
        check_detokenized(&[0xF0, 0x41, 0x42], "|\u{FFFD}A|B||");
        check_detokenized(&[0x80, 0x80, 0x41], "||\u{FFFD}\u{FFFD}A||");
        // A generation that ends inside a character, or on a U+FFFD it generated, ends with U+FFFD.
        check_detokenized(&bytes("a🦀")[..4], "a|||||\u{FFFD}");
        check_detokenized(&[0xE6, 0x97, 0xA5, 0xE6], "||日|||\u{FFFD}");
        check_detokenized(&bytes("a\u{FFFD}"), "a|||||\u{FFFD}");
    }

    /// Why `Detokenizer` is not `tokenizers::DecodeStream`: same pieces, but nothing to flush the
    /// unfinished character at the end with. If this fails, `DecodeStream` may now do what
    /// `Detokenizer::finish` does, and could replace it.
    #[test]
    fn decode_stream_has_no_finish() {
        let tok = byte_level_tokenizer();
        let ids = &bytes("a🦀")[..4];
        let mut stream = tok.inner.as_ref().unwrap().decode_stream(true);
        let streamed: String = ids.iter().filter_map(|&id| stream.step(id).unwrap()).collect();
        let mut d = Detokenizer::default();
        let pieces: String = ids.iter().map(|&id| d.push(&tok, id)).collect();
        assert_eq!(streamed, pieces);
        assert_eq!((streamed, tok.decode(ids)), ("a".to_owned(), "a\u{FFFD}".to_owned()));
    }

    #[test]
    fn a_stop_sequence_of_characters_split_across_tokens_is_matched_and_never_released() {
        // The tokens of "x ✓!" one by one, through the detokenizer and then the stop matcher.
        let tok = byte_level_tokenizer();
        let mut d = Detokenizer::default();
        let mut stops = StopMatcher::new(vec!["✓!".into()]);
        let released: Vec<(String, bool)> = bytes("x ✓!").iter().map(|&id| stops.push(&d.push(&tok, id))).collect();
        let expected = [("x", false), (" ", false), ("", false), ("", false), ("", false), ("", true)];
        assert_eq!(released, expected.map(|(t, s)| (t.to_owned(), s)));
    }
}
