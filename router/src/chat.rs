//! Chat templates: rendering chat messages into a prompt with the model's own Jinja template,
//! from its `tokenizer_config.json`, the way Hugging Face `transformers`' `apply_chat_template`
//! does (blocks trimmed and left-stripped; `messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token` and `raise_exception` in scope; Python string and dict methods through
//! minijinja-contrib's pycompat).

use minijinja::{Environment, Error, ErrorKind};
use serde_json::Value;

/// A model's compiled chat template and the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).field("eos_token", &self.eos_token).finish()
    }
}

/// A special token in `tokenizer_config.json`: a string, or an `AddedToken` object with `content`.
fn token(config: &Value, name: &str) -> String {
    match &config[name] {
        Value::String(s) => s.clone(),
        Value::Object(o) => o.get("content").and_then(Value::as_str).unwrap_or_default().to_owned(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template of `tokenizer_config.json`: its `chat_template`, a string, or a list of
    /// named templates of which the one named `default` is used. An error says why there is none.
    pub fn from_tokenizer_config(json: &str) -> Result<Self, String> {
        if json.is_empty() {
            return Err("the model folder has no tokenizer_config.json, so no chat template".into());
        }
        let config: Value = serde_json::from_str(json).map_err(|e| format!("tokenizer_config.json: {e}"))?;
        let source = match &config["chat_template"] {
            Value::String(s) => s.clone(),
            Value::Array(named) => named
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .ok_or("tokenizer_config.json: `chat_template` is a list without a `default` template")?
                .to_owned(),
            _ => return Err("the model's tokenizer_config.json has no `chat_template`".into()),
        };
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", source)
            .map_err(|e| format!("the model's chat template does not compile: {e}"))?;
        Ok(ChatTemplate { env, bos_token: token(&config, "bos_token"), eos_token: token(&config, "eos_token") })
    }

    /// The prompt for `messages` (objects with `role` and `content`, as the request gave them).
    pub fn render(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String, String> {
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(minijinja::context! {
                messages => minijinja::Value::from_serialize(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|e| match e.kind() {
                // The template's own refusal (`raise_exception`): its message is for the user.
                ErrorKind::InvalidOperation => e.detail().unwrap_or("the chat template refused").to_owned(),
                _ => format!("the chat template failed: {e}"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2's ChatML template, as its tokenizer_config.json carries it.
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// Llama 2's template: `bos_token`, `raise_exception`, `.strip()` (pycompat) and blocks.
    const LLAMA2: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

    fn config(template: &str) -> String {
        serde_json::json!({
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "chat_template": template,
        })
        .to_string()
    }

    fn messages(pairs: &[(&str, &str)]) -> Vec<Value> {
        pairs.iter().map(|(role, content)| serde_json::json!({"role": role, "content": content})).collect()
    }

    #[test]
    fn chatml_renders_as_transformers_does() {
        let t = ChatTemplate::from_tokenizer_config(&config(CHATML)).unwrap();
        let got = t.render(&messages(&[("user", "Hi!")]), true).unwrap();
        assert_eq!(
            got,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        );
        let got = t.render(&messages(&[("system", "Be brief."), ("user", "Hi!")]), false).unwrap();
        assert_eq!(got, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n");
    }

    #[test]
    fn llama2_renders_with_bos_strip_and_raise_exception() {
        // `.strip()` of the joined system and user text, as Python's: the inner space stays.
        let t = ChatTemplate::from_tokenizer_config(&config(LLAMA2)).unwrap();
        let got = t.render(&messages(&[("system", "Be brief."), ("user", " Hi! "), ("assistant", "Hello.")]), true);
        assert_eq!(got.unwrap(), "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi! [/INST] Hello. </s>");
        let refused = t.render(&messages(&[("assistant", "x")]), true).unwrap_err();
        assert_eq!(refused, "Conversation roles must alternate user/assistant/user/assistant/...");
    }

    #[test]
    fn a_named_default_template_is_used_and_a_missing_one_is_named() {
        let named = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{{ messages[0].content }}"},
        ]});
        let t = ChatTemplate::from_tokenizer_config(&named.to_string()).unwrap();
        assert_eq!(t.render(&messages(&[("user", "x")]), true).unwrap(), "x");
        let none = ChatTemplate::from_tokenizer_config(r#"{"eos_token": "</s>"}"#).unwrap_err();
        assert_eq!(none, "the model's tokenizer_config.json has no `chat_template`");
        assert!(ChatTemplate::from_tokenizer_config("").unwrap_err().contains("no tokenizer_config.json"));
        assert!(ChatTemplate::from_tokenizer_config(&config("{% if %}")).unwrap_err().contains("does not compile"));
    }
}
