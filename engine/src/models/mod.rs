//! Model architectures and what they share: the ragged batch a forward pass takes, the
//! attention over a sequence's cached K/V, and the basic layers.
//!
//! A forward pass takes a flat batch of tokens from several sequences at once: each sequence
//! contributes a chunk of new tokens (a whole prompt, part of a prompt, or one decode token)
//! after the tokens it already has in the KV cache. The dense layers run over all tokens
//! together; attention runs per sequence over its own cache range.

pub mod falcon;
pub mod gpt_bigcode;
pub mod llama;
mod parallel;

use tch::{Device, Kind, Tensor};

use std::cell::OnceCell;
use std::sync::Arc;

use crate::error::Result;
use crate::hf::config::{Activation, Dtype, Llama3Rope, ModelConfig, RopeScaling};
use crate::hf::weights::Checkpoint;
use crate::kernels::int8::Int8Matrix;
use crate::kernels::{WeightForm, amx, attention};
use crate::kv_cache::{KvPool, KvShape, KvSlot};
use crate::parallel::comm::Communicator;
use crate::parallel::heads::ShardHeads;

/// One sequence's part of a batch.
#[derive(Clone, Debug)]
pub struct SeqChunk {
    /// The sequence's blocks of the pool.
    pub slot: KvSlot,
    /// Tokens already in the cache (the position of the chunk's first token).
    pub n_cached: i64,
    /// Tokens in this chunk.
    pub n_new: i64,
}

/// A flat batch of token chunks; see the module comment.
pub struct Batch {
    /// `(n_tokens,)` token ids of all chunks, in chunk order.
    pub token_ids: Tensor,
    /// `(n_tokens,)` position of each token in its sequence.
    pub positions: Tensor,
    pub chunks: Vec<SeqChunk>,
    /// `(n_rows,)` indices into the tokens whose logits are wanted.
    pub logit_rows: Tensor,
    /// The one-token chunks, if any: attended together (`cached_attention`).
    decode: Option<DecodeRows>,
}

/// A batch's one-token (decode) chunks, for attention over all their caches in one call per
/// layer: each sequence's blocks read in place (AMX), or its cached keys gathered into a
/// padded `(n, longest)` block, with a mask. The indices are the same for every layer, so they
/// are built once per batch (the gather's on its first use).
struct DecodeRows {
    /// `(n,)` rows of these tokens in the batch.
    rows: Tensor,
    /// `rows` is every row of the batch, in order (a step of decodes only).
    all: bool,
    /// Pool positions where their keys and values go, and the same as an `(n,)` tensor.
    positions: Vec<i64>,
    positions_tensor: Tensor,
    /// Each sequence's blocks and its keys, the new one included.
    slots: Vec<KvSlot>,
    lens: Vec<i64>,
    longest: i64,
    /// For the gather (`gathered`), of all the keys and of a window's (a model has one window):
    /// `(n * read,)` pool positions of each sequence's keys, padded with its last one, and
    /// `(n, 1, 1, read)`, true where a key is the sequence's own.
    gathered: [OnceCell<(Tensor, Tensor)>; 2],
}

impl DecodeRows {
    fn new(chunks: &[SeqChunk], device: Device) -> Option<Self> {
        // Each one-token chunk, and its row in the batch.
        let (mut rows, mut decoding) = (Vec::new(), Vec::new());
        let mut row = 0;
        for chunk in chunks {
            if chunk.n_new == 1 {
                rows.push(row);
                decoding.push(chunk);
            }
            row += chunk.n_new;
        }
        // One token on CUDA attends a view of its cache: no kernel reads the pool in place there.
        if rows.is_empty() || (rows.len() < 2 && device.is_cuda()) {
            return None;
        }
        let slots: Vec<KvSlot> = decoding.iter().map(|c| c.slot.clone()).collect();
        let lens: Vec<i64> = decoding.iter().map(|c| c.n_cached + 1).collect();
        let tensor = |v: &[i64]| Tensor::from_slice(v).to_device(device);
        let positions: Vec<i64> = slots.iter().zip(&lens).map(|(slot, len)| slot.position(len - 1)).collect();
        Some(DecodeRows {
            all: rows.len() as i64 == row,
            rows: tensor(&rows),
            positions_tensor: tensor(&positions),
            positions,
            longest: *lens.iter().max().expect("one or more"),
            slots,
            lens,
            gathered: Default::default(),
        })
    }

    /// The most keys a sequence's token reads: all of the longest sequence's, or a window's.
    fn read(&self, window: Option<i64>) -> i64 {
        window.map_or(self.longest, |w| self.longest.min(w))
    }

    /// The gather's key positions and mask (see the field) for the keys each token reads within
    /// `window`, built on first use.
    fn gathered(&self, window: Option<i64>) -> &(Tensor, Tensor) {
        let window = window.filter(|&w| w < self.longest);
        let read = self.read(window);
        self.gathered[window.is_some() as usize].get_or_init(|| {
            let (mut keys, mut mask) = (Vec::new(), Vec::new());
            for (slot, &len) in self.slots.iter().zip(&self.lens) {
                // The sequence's last `own` keys, from `first`.
                let own = len.min(read);
                let first = len - own;
                keys.extend((0..read).map(|j| slot.position(first + j.min(own - 1))));
                mask.extend((0..read).map(|j| j < own));
            }
            let (n, device) = (self.lens.len() as i64, self.rows.device());
            let mask = Tensor::from_slice(&mask).view([n, 1, 1, read]).to_device(device);
            (Tensor::from_slice(&keys).to_device(device), mask)
        })
    }
}

/// What a caller asks of one sequence in a batch.
pub struct ChunkInput<'a> {
    pub token_ids: &'a [u32],
    pub slot: KvSlot,
    pub n_cached: i64,
    /// Which of the chunk's tokens need logits.
    pub logits: Logits,
}

/// Which tokens of a chunk need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// None: a prompt chunk that does not end the prompt.
    None,
    /// The last token's: the next token is sampled from it.
    Last,
    /// Every token's: scoring a sequence.
    All,
}

impl Batch {
    pub fn new(inputs: &[ChunkInput<'_>], device: Device) -> Self {
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut rows = Vec::new();
        let mut chunks = Vec::with_capacity(inputs.len());
        for input in inputs {
            let n_new = input.token_ids.len() as i64;
            let first_row = ids.len() as i64;
            ids.extend(input.token_ids.iter().map(|&t| t as i64));
            positions.extend(input.n_cached..input.n_cached + n_new);
            match input.logits {
                Logits::None => {}
                Logits::Last => rows.push(first_row + n_new - 1),
                Logits::All => rows.extend(first_row..first_row + n_new),
            }
            chunks.push(SeqChunk { slot: input.slot.clone(), n_cached: input.n_cached, n_new });
        }
        Batch {
            token_ids: Tensor::from_slice(&ids).to_device(device),
            positions: Tensor::from_slice(&positions).to_device(device),
            decode: DecodeRows::new(&chunks, device),
            chunks,
            logit_rows: Tensor::from_slice(&rows).to_device(device),
        }
    }
}

/// The shapes a server needs to know about a model.
#[derive(Clone, Debug)]
pub struct ModelShape {
    pub n_layers: i64,
    pub n_heads: i64,
    pub n_kv_heads: i64,
    pub head_dim: i64,
    pub vocab_size: i64,
    pub max_context: i64,
    /// The layers whose tokens attend only a window of keys, if any.
    pub sliding_window: Option<SlidingWindow>,
}

/// A sliding window: `layers` of a model's layers attend only each token's last `tokens` keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlidingWindow {
    pub tokens: i64,
    pub layers: i64,
}

impl ModelShape {
    /// The model's width: query heads x head_dim (`n_embd`, `hidden_size`).
    pub fn hidden(&self) -> i64 {
        self.n_heads * self.head_dim
    }
}

/// A model's shape and this shard's part of it: its query and K/V heads, its vocabulary rows,
/// and its end of the communicator group (a world of one at TP 1).
pub struct Shard {
    pub shape: ModelShape,
    pub dtype: Dtype,
    pub device: Device,
    pub heads: ShardHeads,
    /// `heads.queries_per_kv_head()`, for attention.
    pub queries_per_kv_head: Vec<i64>,
    pub(crate) vocab: parallel::VocabShard,
    pub comm: Arc<dyn Communicator>,
    /// The form the matrices are kept in: `Placement::weight_form` as far as `dtype` and
    /// `device` allow.
    pub weight_form: WeightForm,
}

impl Shard {
    pub fn new(shape: ModelShape, placement: Placement, comm: Arc<dyn Communicator>) -> Self {
        let Placement { dtype, device, weight_form } = placement;
        let heads = ShardHeads::new(shape.n_heads, shape.n_kv_heads, comm.rank(), comm.world_size());
        let vocab = parallel::VocabShard::new(shape.vocab_size, comm.as_ref());
        let weight_form = weight_form.resolve(dtype.kind(), device);
        let queries_per_kv_head = heads.queries_per_kv_head();
        Shard { queries_per_kv_head, shape, dtype, device, heads, vocab, comm, weight_form }
    }
}

/// Where a shard keeps its weights, and in what form.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    pub dtype: Dtype,
    pub device: Device,
    /// The form asked for the matrices; each shard keeps what its dtype and device allow.
    pub weight_form: WeightForm,
}

/// A causal language model over a shared KV pool.
pub trait CausalLm: Send {
    /// The model's shape and this shard's part of it.
    fn shard(&self) -> &Shard;
    fn shape(&self) -> &ModelShape {
        &self.shard().shape
    }
    fn dtype(&self) -> Dtype {
        self.shard().dtype
    }
    fn device(&self) -> Device {
        self.shard().device
    }
    /// The K/V heads this shard caches (all of them at TP 1; for multi-query attention, the
    /// one head, on every shard).
    fn kv_shape(&self) -> KvShape {
        let s = self.shard();
        KvShape { n_layers: s.shape.n_layers, n_kv_heads: s.heads.n_kv_heads, head_dim: s.shape.head_dim }
    }
    /// Bytes of weights one forward pass reads on this shard.
    fn weight_bytes(&self) -> i64;
    /// Runs `batch`, storing its K/V in `kv`; returns f32 logits `(n_rows, vocab_size)` for the
    /// batch's `logit_rows`.
    fn forward(&self, batch: &Batch, kv: &KvPool) -> Result<Tensor>;
}

/// Loads shard `comm.rank()` of the model `config` describes from `checkpoint`.
pub fn load(
    config: &ModelConfig,
    checkpoint: &Checkpoint,
    placement: Placement,
    comm: Arc<dyn Communicator>,
) -> Result<Box<dyn CausalLm>> {
    match config {
        ModelConfig::GptBigCode(c) => Ok(Box::new(gpt_bigcode::GptBigCode::load(c, checkpoint, placement, comm)?)),
        ModelConfig::Falcon(c) => Ok(Box::new(falcon::Falcon::load(c, checkpoint, placement, comm)?)),
        ModelConfig::Llama(c) => Ok(Box::new(llama::Llama::load(c, checkpoint, placement, comm)?)),
    }
}

/// Attention of a batch's new tokens, each over its own sequence's cache, after storing their
/// keys and values in it. `q` is `(n_tokens, n_heads, head_dim)` and `k`, `v` are
/// `(n_tokens, n_kv_heads, head_dim)`, this shard's heads; `queries_per_kv_head` says how many
/// consecutive query heads read each K/V head (`ShardHeads::queries_per_kv_head`). Returns
/// `(n_tokens, n_heads * head_dim)`, heads in order.
///
/// Decode tokens (chunks of one) are attended together, in one call per layer, when the shard's
/// groups are equal and either a kernel reads the caches in place here
/// (`attention::Kernel::for_cache`: AMX, or AVX-512 with bf16 dot products; even for one
/// token) or there are several and their caches are short enough to gather
/// (`GATHERED_KEY_BYTES`);
/// LibTorch's fused attention costs tens of microseconds a call whatever its size, so one call
/// per sequence and layer added up to a fifth of a batch-32 step. Other chunks are attended one
/// by one, in place.
pub(crate) fn cached_attention(
    layer: usize,
    qkv: (&Tensor, &Tensor, &Tensor),
    batch: &Batch,
    kv: &KvPool,
    queries_per_kv_head: &[i64],
    scale: f64,
) -> Tensor {
    let scores = Scores { scale, window: None, softcap: None };
    cached_attention_in_window(layer, qkv, batch, kv, queries_per_kv_head, scores)
}

/// How a layer's queries score its keys.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scores {
    /// Multiplies `q . k`.
    pub scale: f64,
    /// Each query at position `p` attends only the keys at positions `p - window < j <= p`
    /// (Mistral's and Gemma's sliding window, as `transformers`' `sliding_window_overlay`).
    pub window: Option<i64>,
    /// Scaled scores become `cap * tanh(scores / cap)` before the mask (Gemma 2's
    /// `attn_logit_softcapping`, as its `eager_attention_forward`).
    pub softcap: Option<f64>,
}

/// `cached_attention` with a window and soft-capped scores where `scores` says. A window is
/// read, not only masked: each token reads the cache from its window's first key on (decode:
/// the last `window` keys), so a sliding layer reads at most `window` keys a token whatever the
/// context; the pool keeps the older keys (a window's are not freed early). Decode tokens are
/// attended together unless the scores are capped (the fused kernels cannot); the in-place
/// kernels read whole caches, so once a sequence outgrows the window its layer gathers the
/// window instead.
pub(crate) fn cached_attention_in_window(
    layer: usize,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    batch: &Batch,
    kv: &KvPool,
    queries_per_kv_head: &[i64],
    scores: Scores,
) -> Tensor {
    let (scale, window) = (scores.scale, scores.window);
    let uniform = queries_per_kv_head.windows(2).all(|w| w[0] == w[1]);
    let key_bytes_per_token = k.size()[1] * k.size()[2] * k.kind().elt_size_in_bytes() as i64;
    // The kernel that reads the pool in place, where one runs here and no window cuts the keys.
    let group = queries_per_kv_head.iter().copied().max().unwrap_or(1);
    let in_place = attention::Kernel::for_cache(k.kind(), k.device(), k.size()[2], group)
        .filter(|_| batch.decode.as_ref().is_some_and(|d| window.is_none_or(|w| d.longest <= w)));
    let decode = batch.decode.as_ref().filter(|d| {
        uniform
            && decode_in_one_call(k.device(), in_place.is_some(), d.lens.len(), d.read(window) * key_bytes_per_token)
            && scores.softcap.is_none()
    });
    if let Some(d) = decode.filter(|d| d.all) {
        return attend_decode(layer, (q, k, v), d, kv, (scale, window), in_place);
    }
    // (first row, output) of each chunk attended on its own.
    let mut outputs = Vec::with_capacity(batch.chunks.len());
    let mut row = 0;
    for chunk in &batch.chunks {
        if decode.is_none() || chunk.n_new > 1 {
            let rows = |t: &Tensor| t.narrow(0, row, chunk.n_new);
            // The cache is (n_kv_heads, n_tokens, head_dim).
            kv.write(layer, &chunk.slot, chunk.n_cached, &rows(k).transpose(0, 1), &rows(v).transpose(0, 1));
            // The first key the chunk's first query may read.
            let first_key = window.map_or(0, |w| (chunk.n_cached + 1 - w).max(0));
            let (k_read, v_read) = kv.view(layer, &chunk.slot, first_key, chunk.n_cached + chunk.n_new - first_key);
            let positions = Positions { n_cached: chunk.n_cached, first_key };
            let attended = attend(&rows(q), &k_read, &v_read, positions, scores, queries_per_kv_head);
            outputs.push((row, attended));
        }
        row += chunk.n_new;
    }
    let Some(d) = decode else {
        let mut outputs: Vec<Tensor> = outputs.into_iter().map(|(_, y)| y).collect();
        return if outputs.len() == 1 { outputs.pop().unwrap() } else { Tensor::cat(&outputs, 0) };
    };
    // Decodes beside prefill chunks: each output to its rows.
    let decoded = attend_decode(layer, (q, k, v), d, kv, (scale, window), in_place);
    let out = decoded.new_zeros([row, decoded.size()[1]], (decoded.kind(), decoded.device()));
    let _ = out.shallow_clone().index_copy_(0, &d.rows, &decoded);
    for (first, y) in outputs {
        out.narrow(0, first, y.size()[0]).copy_(&y);
    }
    out
}

/// The most bytes of keys per sequence and layer that decode attention gathers to attend a
/// batch in one call. Gathering copies the keys and values a step reads; below this the copy
/// costs less than a call per sequence (SantaCoder, bf16, 2 cores: multi-query at batch 32 and
/// ~300 tokens, 96 KiB, -10% a step; at batch 8 and 2048 tokens, 512 KiB, even; multi-head at
/// batch 8 and 2048 tokens, 8 MiB, 5x slower).
const GATHERED_KEY_BYTES: i64 = 256 << 10;

/// Whether the `n` decode tokens of a batch are attended in one call (`attend_decode`) rather
/// than one call per sequence, given the longest sequence's keys of one layer in bytes. When a
/// kernel reads the pool in place, always, even for one token: LibTorch's attention over a view
/// of the cache costs more in its own overhead than the in-place kernel does in all (SantaCoder
/// MQA, batch 1, context 128, on an AMX Xeon: 120 us a layer against 50, the cache write and
/// the query split included). Otherwise for two tokens or more (one
/// sequence's keys are a view of the pool, not a gather): on CUDA always, since a launch per
/// sequence and layer costs far more than gathering the keys, which the device copies at its
/// memory bandwidth; on the CPU when the gather is small enough to pay (`GATHERED_KEY_BYTES`).
fn decode_in_one_call(device: Device, in_place: bool, n: usize, longest_key_bytes: i64) -> bool {
    in_place || (n >= 2 && (device.is_cuda() || longest_key_bytes <= GATHERED_KEY_BYTES))
}

/// `cached_attention` of `d`'s tokens, one each from several sequences, in one call: by the
/// `in_place` kernel over each sequence's blocks of the pool, otherwise over each sequence's keys
/// (its last `window` ones) gathered from the pool into a padded block that the mask trims.
fn attend_decode(
    layer: usize,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    d: &DecodeRows,
    kv: &KvPool,
    (scale, window): (f64, Option<i64>),
    in_place: Option<attention::Kernel>,
) -> Tensor {
    let pick = |t: &Tensor| if d.all { t.shallow_clone() } else { t.index_select(0, &d.rows) };
    let (q, k, v) = (pick(q), pick(k), pick(v));
    kv.write_tokens(layer, (&d.positions, &d.positions_tensor), &k.transpose(0, 1), &v.transpose(0, 1));
    let [n, n_heads, head_dim] = q.size()[..] else { unreachable!("q must be 3-d") };
    if let Some(kernel) = in_place {
        // The blocks come from the scheduler, so a failure here is a bug: panic like tch.
        let y = attention::decode_attention(kernel, &q, kv.layer(layer), &d.slots, &d.lens, scale)
            .unwrap_or_else(|e| panic!("decode attention of layer {layer}: {e}"));
        return y.view([n, n_heads * head_dim]);
    }
    let n_kv_heads = k.size()[1];
    let (key_positions, mask) = d.gathered(window);
    // (n_kv_heads, n * read, head_dim) -> (n, n_kv_heads, read, head_dim)
    let (keys, values) = kv.gather(layer, key_positions);
    let block = |t: Tensor| t.view([n_kv_heads, n, d.read(window), head_dim]).transpose(0, 1);
    // Query heads kv * group .. (kv + 1) * group read K/V head kv: (n, n_kv_heads, group, head_dim).
    let q = q.view([n, n_kv_heads, n_heads / n_kv_heads, head_dim]);
    let y =
        Tensor::scaled_dot_product_attention(&q, &block(keys), &block(values), Some(mask), 0.0, false, scale, false);
    y.reshape([n, n_heads * head_dim])
}

/// Where a chunk's queries and keys sit in its sequence: the queries at `n_cached ..`, the keys
/// read at `first_key .. n_cached + n_new` (0 unless a window hides the earlier ones).
#[derive(Clone, Copy, Debug)]
struct Positions {
    n_cached: i64,
    first_key: i64,
}

/// Causal attention of one sequence's new queries over its cached keys and values.
///
/// `q` is `(n_new, n_heads, head_dim)`; `k` and `v` are `(n_kv_heads, n_cached + n_new -
/// first_key, head_dim)` views of the cache (`Positions`). The query heads that share a K/V head are stacked as the query rows of
/// that head, so a shared head is read once for all of them and never repeated: for multi-query
/// attention all `n_heads` queries meet the single K/V head in one call. When a shard holds
/// different numbers of queries per K/V head (a group split between shards), each K/V head is
/// attended on its own. Returns `(n_new, n_heads * head_dim)`, heads in order.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, at: Positions, scores: Scores, queries_per_kv_head: &[i64]) -> Tensor {
    if queries_per_kv_head.windows(2).all(|w| w[0] == w[1]) {
        return attend_groups(q, k, v, at, scores);
    }
    let mut first = 0;
    let outputs: Vec<Tensor> = queries_per_kv_head
        .iter()
        .enumerate()
        .map(|(kv_idx, &n)| {
            let (kv_idx, q) = (kv_idx as i64, q.narrow(1, first, n));
            first += n;
            attend_groups(&q, &k.narrow(0, kv_idx, 1), &v.narrow(0, kv_idx, 1), at, scores)
        })
        .collect();
    Tensor::cat(&outputs, 1)
}

/// `attend` for equal groups: `n_heads / n_kv_heads` consecutive query heads per K/V head.
///
/// LibTorch's fused CPU attention is used rather than `bmm`: a bf16 `bmm` goes through oneDNN,
/// which compiles a kernel for every new shape, and the key length changes every decode step
/// (1.3 ms against 0.06 ms per call on the development machine).
fn attend_groups(q: &Tensor, k: &Tensor, v: &Tensor, at: Positions, scores: Scores) -> Tensor {
    let [n_new, n_heads, head_dim] = q.size()[..] else { unreachable!("q must be 3-d") };
    let (n_kv_heads, n_read) = (k.size()[0], k.size()[1]);
    let (group, scale, n_cached) = (n_heads / n_kv_heads, scores.scale, at.n_cached);
    // Whether the window drops a key read here that a later query would otherwise see.
    let windowed = scores.window.filter(|&w| n_read > w);
    if n_new > 1 && n_cached == 0 && windowed.is_none() && scores.softcap.is_none() {
        return attend_causal(q, k, v, group, scale);
    }
    // (1, n_kv_heads, n_new * group, head_dim): row i * group + g is head kv * group + g at token i.
    let q = q.view([n_new, n_kv_heads, group, head_dim]).permute([1, 0, 2, 3]).reshape([
        1,
        n_kv_heads,
        n_new * group,
        head_dim,
    ]);
    // Decode (one new token) sees the whole cache; a chunk of several tokens needs the causal
    // mask, offset by the tokens already cached, and a window its lower bound.
    let mask = (n_new > 1 || windowed.is_some()).then(|| {
        let device = q.device();
        let query_pos =
            Tensor::arange(n_new, (Kind::Int64, device)).repeat_interleave_self_int(group, 0, None) + n_cached;
        let key_pos = Tensor::arange_start(at.first_key, n_cached + n_new, (Kind::Int64, device));
        let (key_pos, query_pos) = (key_pos.unsqueeze(0), query_pos.unsqueeze(1));
        // (n_new * group, n_read): true where the key may be attended to.
        let causal = key_pos.le_tensor(&query_pos);
        match windowed {
            Some(w) => causal.logical_and(&key_pos.gt_tensor(&(query_pos - w))),
            None => causal,
        }
    });
    let y = match scores.softcap {
        None => Tensor::scaled_dot_product_attention(
            &q,
            &k.unsqueeze(0),
            &v.unsqueeze(0),
            mask.as_ref(),
            0.0,
            false,
            scale,
            false,
        ),
        Some(cap) => {
            // (1, n_kv_heads, n_new * group, n_read), softmax in f32 as the reference.
            let s = soft_cap(&(q.matmul(&k.unsqueeze(0).transpose(-1, -2)) * scale), cap);
            let s = match &mask {
                Some(mask) => s.masked_fill(&mask.logical_not(), f64::NEG_INFINITY),
                None => s,
            };
            s.softmax(-1, Kind::Float).to_kind(q.kind()).matmul(&v.unsqueeze(0))
        }
    };
    // (1, n_kv_heads, n_new * group, head_dim) -> (n_new, n_heads * head_dim)
    y.view([n_kv_heads, n_new, group, head_dim]).permute([1, 0, 2, 3]).reshape([n_new, n_heads * head_dim])
}

/// `attend_groups` for a chunk that starts its sequence (nothing cached): plain causal
/// attention, which LibTorch's fused kernel runs without a mask and without the blocks above
/// the diagonal. The K/V heads are the batch and each is repeated over its query heads as a
/// view (stride 0), not a copy.
fn attend_causal(q: &Tensor, k: &Tensor, v: &Tensor, group: i64, scale: f64) -> Tensor {
    let [n_new, n_heads, head_dim] = q.size()[..] else { unreachable!("q must be 3-d") };
    let n_kv_heads = n_heads / group;
    // (n_new, n_heads, head_dim) -> (n_kv_heads, group, n_new, head_dim)
    let q = q.view([n_new, n_kv_heads, group, head_dim]).permute([1, 2, 0, 3]);
    let repeat = |t: &Tensor| t.unsqueeze(1).expand([n_kv_heads, group, n_new, head_dim], false);
    let y = Tensor::scaled_dot_product_attention(&q, &repeat(k), &repeat(v), None::<&Tensor>, 0.0, true, scale, false);
    y.permute([2, 0, 1, 3]).reshape([n_new, n_heads * head_dim])
}

/// A dense layer `y = x W^T + b`, weights as stored by Hugging Face (`(out, in)`), kept in one
/// form: the one the products here read fastest.
pub(crate) struct Linear {
    matrix: Matrix,
    pub bias: Option<Tensor>,
}

enum Matrix {
    /// As stored, for LibTorch's plain `linear`.
    Plain(Tensor),
    /// Prepacked for oneDNN (only `onednn::linear` reads it).
    Packed(Tensor),
    /// AMX tiles, with the bias in f32 (`amx::Tiles`).
    Tiles(amx::Tiles, Option<Tensor>),
    /// int8 with a scale per output channel (`--quantize int8`); on AMX tiles, with the bias
    /// in f32 (`Int8Matrix::amx_linear`).
    Int8(Int8Matrix, Option<Tensor>),
}

impl Linear {
    /// The weight in `form`, a shard's resolved `Shard::weight_form`; a matrix whose shape the
    /// tiles do not take is packed for oneDNN instead.
    pub fn new(weight: Tensor, bias: Option<Tensor>, form: WeightForm) -> Result<Self> {
        if form == WeightForm::Int8 {
            let matrix = Int8Matrix::quantize(&weight)?;
            let f32_bias = bias.as_ref().filter(|_| matrix.on_amx()).map(|b| b.to_kind(Kind::Float).contiguous());
            return Ok(Linear { matrix: Matrix::Int8(matrix, f32_bias), bias });
        }
        let tiles = if form == WeightForm::Tiles { amx::Tiles::pack(&weight) } else { None };
        let matrix = match tiles {
            Some(t) => Matrix::Tiles(t, bias.as_ref().map(|b| b.to_kind(Kind::Float).contiguous())),
            None if form != WeightForm::Plain => Matrix::Packed(crate::kernels::onednn::pack(&weight)?),
            None => Matrix::Plain(weight),
        };
        Ok(Linear { matrix, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.run(x, true, None)
    }

    /// `act(forward(x))`; on packed or tiled weights the activation is fused into the product
    /// (the MLP's first layer: one pass less over its widest activations).
    pub fn forward_activated(&self, x: &Tensor, act: Activation) -> Tensor {
        self.run(x, true, Some(act))
    }

    /// `x @ weight.T`, without the bias (row-parallel layers add theirs after the sum).
    pub fn product(&self, x: &Tensor) -> Tensor {
        self.run(x, false, None)
    }

    fn run(&self, x: &Tensor, with_bias: bool, act: Option<Activation>) -> Tensor {
        // Shapes were checked at load, so a failure here is a bug: panic like tch's own calls.
        let failed = |e: tch::TchError| -> Tensor { panic!("linear of {:?}: {e}", x.size()) };
        let y = match &self.matrix {
            Matrix::Tiles(tiles, f32_bias) => {
                return tiles.linear(x, f32_bias.as_ref().filter(|_| with_bias), act).unwrap_or_else(failed);
            }
            Matrix::Packed(packed) => {
                return crate::kernels::onednn::linear(x, packed, self.bias.as_ref().filter(|_| with_bias), act)
                    .unwrap_or_else(failed);
            }
            Matrix::Plain(weight) => x.linear(weight, self.bias.as_ref().filter(|_| with_bias)),
            Matrix::Int8(m, f32_bias) if m.on_amx() => {
                return m.amx_linear(x, f32_bias.as_ref().filter(|_| with_bias), act).unwrap_or_else(failed);
            }
            Matrix::Int8(m, _) => {
                let y = m.product(x).unwrap_or_else(failed);
                match self.bias.as_ref().filter(|_| with_bias) {
                    Some(b) => y + b,
                    None => y,
                }
            }
        };
        match act {
            Some(act) => act.apply(&y),
            None => y,
        }
    }

    /// Bytes a product reads: the matrix in its form, and the bias.
    pub fn bytes(&self) -> i64 {
        let matrix = match &self.matrix {
            Matrix::Plain(w) | Matrix::Packed(w) => tensor_bytes(w),
            Matrix::Tiles(tiles, _) => tiles.bytes(),
            Matrix::Int8(m, _) => m.bytes(),
        };
        matrix + self.bias.as_ref().map_or(0, tensor_bytes)
    }
}

/// Layer normalisation over the last dimension.
pub(crate) struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.weight.size()[0]], Some(&self.weight), Some(&self.bias), self.eps, false)
    }

    pub fn bytes(&self) -> i64 {
        tensor_bytes(&self.weight) + tensor_bytes(&self.bias)
    }
}

/// Root-mean-square normalisation over the last dimension, as `LlamaRMSNorm`: computed in f32,
/// cast back to the activations' dtype, then scaled by the weight. Gemma's (`unit_offset`, as
/// `GemmaRMSNorm`) scales by `1 + weight` in f32, then casts.
pub(crate) struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
    pub unit_offset: bool,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let x = x.to_kind(Kind::Float);
        let variance = x.square().mean_dim(-1, true, Kind::Float);
        let normed = x * (variance + self.eps).rsqrt();
        if self.unit_offset {
            return (normed * (self.weight.to_kind(Kind::Float) + 1.0)).to_kind(kind);
        }
        &self.weight * normed.to_kind(kind)
    }

    pub fn bytes(&self) -> i64 {
        tensor_bytes(&self.weight)
    }
}

/// A block's norm: RMSNorm, or LayerNorm with a bias (Starcoder2).
pub(crate) enum Norm {
    Rms(RmsNorm),
    Layer(LayerNorm),
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Norm::Rms(n) => n.forward(x),
            Norm::Layer(n) => n.forward(x),
        }
    }

    pub fn bytes(&self) -> i64 {
        match self {
            Norm::Rms(n) => n.bytes(),
            Norm::Layer(n) => n.bytes(),
        }
    }
}

/// The gated MLP of Llama-architecture models, `down_proj(silu(gate_proj(x)) * up_proj(x))`
/// (Gemma's GeGLU: GELU for SiLU), tensor-parallel: a shard holds its part of the intermediate
/// width.
pub(crate) struct GatedMlp {
    /// The gate's activation: None for SiLU.
    pub act: Option<Activation>,
    /// Column-parallel: this shard's rows of `gate_proj` then the same rows of `up_proj`, in
    /// one matrix so both are one product.
    pub gate_up_proj: Linear,
    /// Row-parallel: this shard's input columns of `down_proj`.
    pub down_proj: Linear,
}

impl GatedMlp {
    /// `act(gate) * up` `(n_tokens, intermediate_here)`, before the row-parallel `down_proj`.
    pub fn up(&self, x: &Tensor) -> Tensor {
        let gate_up = self.gate_up_proj.forward(x);
        let half = gate_up.size()[1] / 2;
        let gate = gate_up.narrow(1, 0, half);
        let gate = match self.act {
            None => gate.silu(),
            Some(act) => act.apply(&gate),
        };
        gate * gate_up.narrow(1, half, half)
    }

    pub fn bytes(&self) -> i64 {
        self.gate_up_proj.bytes() + self.down_proj.bytes()
    }
}

/// `cap * tanh(x / cap)`: Gemma's soft-capping of logits, smooth and within `(-cap, cap)`.
pub(crate) fn soft_cap(x: &Tensor, cap: f64) -> Tensor {
    (x / cap).tanh() * cap
}

pub(crate) fn tensor_bytes(t: &Tensor) -> i64 {
    t.numel() as i64 * t.kind().elt_size_in_bytes() as i64
}

/// Rotary position embeddings (RoPE) as Hugging Face computes them: the rotated halves are
/// `[x1, x2] -> [-x2, x1]`, and cos/sin are computed in f32 and cast to the activations' dtype.
pub(crate) struct Rotary {
    /// `(max_positions, head_dim)` f32 tables.
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    pub fn new(head_dim: i64, theta: f64, max_positions: i64, device: Device) -> Self {
        Self::scaled(head_dim, theta, None, max_positions, device)
    }

    /// `new`, with the frequencies scaled as `scaling` says.
    pub fn scaled(
        head_dim: i64,
        theta: f64,
        scaling: Option<&RopeScaling>,
        max_positions: i64,
        device: Device,
    ) -> Self {
        let f32 = (Kind::Float, device);
        // inv_freq = 1 / theta^(2i / head_dim), as the reference's `compute_default_rope_parameters`.
        let exponent = Tensor::arange_start_step(0, head_dim, 2, f32) / head_dim as f64;
        let mut inv_freq = Tensor::pow_scalar(theta, &exponent).reciprocal();
        match scaling {
            None => {}
            // As `_compute_linear_scaling_rope_parameters`: the frequencies, not the positions.
            Some(RopeScaling::Linear { factor }) => inv_freq /= *factor,
            Some(RopeScaling::Llama3(r)) => inv_freq = llama3_inv_freq(&inv_freq, r),
        }
        // (max_positions, head_dim / 2) -> (max_positions, head_dim)
        let freqs = Tensor::arange(max_positions, f32).unsqueeze(1) * inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], 1);
        Rotary { cos: emb.cos(), sin: emb.sin() }
    }

    /// cos and sin at `positions` `(n_tokens,)`: each `(n_tokens, 1, head_dim)` in `kind`.
    pub fn at(&self, positions: &Tensor, kind: Kind) -> Result<(Tensor, Tensor)> {
        let pick = |t: &Tensor| -> Result<Tensor> { Ok(t.f_index_select(0, positions)?.to_kind(kind).unsqueeze(1)) };
        Ok((pick(&self.cos)?, pick(&self.sin)?))
    }

    /// Rotates `x` `(n_tokens, n_heads, head_dim)` by the angles `at` returned.
    pub fn rotate(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Tensor {
        let half = x.size()[2] / 2;
        let rotated = Tensor::cat(&[-x.narrow(2, half, half), x.narrow(2, 0, half)], 2);
        x * cos + rotated * sin
    }
}

/// Llama 3's frequencies, step by step as `_compute_llama3_parameters` (f32): wavelengths
/// shorter than `original / high_freq_factor` kept, longer than `original / low_freq_factor`
/// divided by `factor`, and those between interpolated.
fn llama3_inv_freq(inv_freq: &Tensor, r: &Llama3Rope) -> Tensor {
    let old_context = r.original_max_position_embeddings;
    let (low_freq_wavelen, high_freq_wavelen) = (old_context / r.low_freq_factor, old_context / r.high_freq_factor);
    let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
    let long = wavelen.gt(low_freq_wavelen);
    // tch's `a.where_self(cond, b)` is `torch.where(cond, a, b)`.
    let scaled = (inv_freq / r.factor).where_self(&long, inv_freq);
    let smooth = (wavelen.reciprocal() * old_context - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
    let smoothed = (smooth.ones_like() - &smooth) * &scaled / r.factor + &smooth * &scaled;
    let medium = wavelen.ge(high_freq_wavelen).logical_and(&long.logical_not());
    smoothed.where_self(&medium, &scaled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_attention_is_one_call_on_cuda_whatever_the_context() {
        let long = 64 * GATHERED_KEY_BYTES;
        // On CUDA long contexts used to fall back to one attention call per sequence and layer.
        assert!(decode_in_one_call(Device::Cuda(0), false, 2, long));
        assert!(decode_in_one_call(Device::Cpu, true, 2, long), "AMX reads the pool in place");
        assert!(decode_in_one_call(Device::Cpu, false, 2, GATHERED_KEY_BYTES));
        assert!(!decode_in_one_call(Device::Cpu, false, 2, GATHERED_KEY_BYTES + 1));
        // One token: the in-place kernel if there is one, else attention over a view of its cache.
        assert!(decode_in_one_call(Device::Cpu, true, 1, 0));
        assert!(!decode_in_one_call(Device::Cpu, false, 1, 0));
        assert!(!decode_in_one_call(Device::Cuda(0), false, 1, 0));
    }
}
