"""Write a tiny llama-architecture GGUF model: deterministic, fast, no hub.

    python tests/engine/tiny_model.py OUT.gguf

2 layers, hidden size 64, a SentencePiece-style vocabulary (the 256 byte tokens, some
word pieces and ChatML's control tokens) and a ChatML chat template. Weights come from
a fixed seed, so greedy decoding gives the same (meaningless) text on every run.
Runs with the ``gguf`` and ``numpy`` packages of the engine's own environment.
"""

from __future__ import annotations

import sys

import gguf
import numpy as np

HIDDEN, LAYERS, HEADS, FF, CONTEXT = 64, 2, 4, 128, 2048
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = [
    "the",
    "a",
    "cat",
    "route",
    "sat",
    "node",
    "token",
    "paid",
    "light",
    "ning",
    "model",
    "gate",
    "way",
    "hello",
    "world",
    "fast",
    "small",
    "owl",
    "run",
    "job",
    "stream",
    "answer",
    "is",
    "of",
]


def vocabulary() -> tuple[list[bytes], list[float], list[int]]:
    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>", b"<|im_start|>", b"<|im_end|>"]
    types = [2, 3, 3, 3, 3]  # UNKNOWN, CONTROL...
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>".encode())
        types.append(6)  # BYTE
    pieces = [p for word in WORDS for p in (word, "\u2581" + word)]
    pieces += ["\u2581" + ch for ch in "abcdefghijklmnopqrstuvwxyz"]
    for piece in dict.fromkeys(pieces):  # each piece once
        tokens.append(piece.encode())
        types.append(1)  # NORMAL
    scores = [0.0] * 5 + [-1000.0] * 256 + [-float(i) for i in range(len(tokens) - 261)]
    return tokens, scores, types


def main(path: str) -> None:
    rng = np.random.default_rng(20261129)
    tokens, scores, types = vocabulary()
    vocab = len(tokens)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("routecat-tiny-test")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(4)  # <|im_end|> ends a turn
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def tensor(name: str, *shape: int, scale: float = 0.3) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    tensor("token_embd.weight", vocab, HIDDEN, scale=1.0)
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        for part in ("q", "k", "v", "output"):
            tensor(f"blk.{i}.attn_{part}.weight", HIDDEN, HIDDEN)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        tensor(f"blk.{i}.ffn_gate.weight", FF, HIDDEN)
        tensor(f"blk.{i}.ffn_up.weight", FF, HIDDEN)
        tensor(f"blk.{i}.ffn_down.weight", HIDDEN, FF)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    logits = (rng.standard_normal((vocab, HIDDEN)) * 1.0).astype(np.float32)
    # End tokens and byte tokens get a constant logit of 0 while some word piece almost
    # surely scores higher under greedy decoding: long streams stay long, and the output
    # is whole words (random bytes would make invalid UTF-8, which servers hold back).
    logits[:261] = 0.0
    w.add_tensor("output.weight", logits)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(sys.argv[1])
