import os
import signal
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models gain nothing from threads; leave the other core to the machine
import transformers  # noqa: E402

from vtrans.arch import Kept, adapter_for  # noqa: E402

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


DECODER = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
               max_position_embeddings=64, num_labels=3, pad_token_id=0)
GPT2 = dict(vocab_size=120, n_embd=32, n_layer=3, n_head=4, n_inner=48, n_positions=64, num_labels=3, pad_token_id=0,
            bos_token_id=1, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

# Every family and head the invariants run over: (model class, config class, config).
FAMILIES = {
    "bert": ("BertForSequenceClassification", "BertConfig", TINY),
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig", TINY | dict(pad_token_id=1, type_vocab_size=1)),
    "gpt2": ("GPT2ForSequenceClassification", "GPT2Config", GPT2),
    "gpt2-lm": ("GPT2LMHeadModel", "GPT2Config", GPT2),  # LM head tied to the token embedding
    "llama-gqa": ("LlamaForSequenceClassification", "LlamaConfig", DECODER | dict(num_key_value_heads=2)),
    "llama-gqa-lm": ("LlamaForCausalLM", "LlamaConfig", DECODER | dict(num_key_value_heads=2)),  # untied
    "llama-lm-tied": ("LlamaForCausalLM", "LlamaConfig", DECODER | dict(tie_word_embeddings=True)),
}


def tiny_model(family: str = "bert", seed: int = 0):
    model_class, config_class, config = FAMILIES[family]
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()


def tiny_batch(seed: int = 0, batch: int = 4, seq: int = 10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, TINY["vocab_size"], (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # some padding, so attention masks are exercised
    return {"input_ids": ids, "attention_mask": mask}


def random_kept(adapter, seed: int = 0, drop_blocks: bool = True) -> Kept:
    """A kept set with different sizes in every layer, one empty attention block and one empty FFN."""
    dims = adapter.dims()
    g = torch.Generator().manual_seed(seed)

    def some(n, low=1):
        k = int(torch.randint(low, n + 1, (1,), generator=g))
        return sorted(torch.randperm(n, generator=g)[:k].tolist())

    attention = [True] * dims.layers
    ffn_block = [True] * dims.layers
    if drop_blocks:
        attention[1] = False
        ffn_block[dims.layers - 1] = False
    return Kept(hidden=some(dims.hidden, 2), heads=[some(dims.heads) for _ in range(dims.layers)],
                ffn=[some(dims.ffn) for _ in range(dims.layers)], attention=attention, ffn_block=ffn_block)


@pytest.fixture(scope="session", autouse=True)
def vtrans_cache(tmp_path_factory):
    """Caches (teachers, OPTIN's scores, latency models) in a directory of this test session's, never the user's:
    a test must not read what an earlier session left. Tests that want a cache of their own still set one."""
    previous = os.environ.get("VTRANS_CACHE")
    os.environ["VTRANS_CACHE"] = str(tmp_path_factory.mktemp("vtrans-cache"))
    yield
    if previous is None:
        del os.environ["VTRANS_CACHE"]
    else:
        os.environ["VTRANS_CACHE"] = previous


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def model_and_adapter(family):
    model = tiny_model(family)
    return model, adapter_for(model)


WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "movie", "plot", "was", "acting", "very", "quite"]


def write_tiny_checkpoint(path, family: str = "bert", with_head: bool = True, seed: int = 0):
    """A tiny model plus a word-level tokenizer, saved like a Hub checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if family in ("bert", "roberta"):
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        vocab = {w: i for i, w in enumerate(specials + WORDS)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        tokens = dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    else:  # decoders, as GPT-2 ships: an end-of-text token and no padding token
        vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "\n"] + WORDS)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tokens = dict(unk_token="<unk>", eos_token="<eos>")
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)
    model = tiny_model(family, seed)
    if family == "roberta":
        model.config.pad_token_id = 0
    if not with_head:
        model = model.base_model
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_sentiment_csv(path, rows: int = 96, seed: int = 0, label_column: str = "label"):
    """Sentences whose label is whether a positive word appears: learnable by a tiny model."""
    import csv
    import random

    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", label_column])
        for i in range(rows):
            label = i % 2
            word = rng.choice(WORDS[:3] if label else WORDS[3:6])
            filler = rng.sample(WORDS[6:], 4)
            writer.writerow([" ".join(filler[:2] + [word] + filler[2:]), label])
    return path


@pytest.fixture
def job(tmp_path):
    """make(method, target, family, **Job fields): a Job on a tiny random model of `family` (BERT by default) as
    the teacher and 200 rows of the toy task."""
    import copy

    from transformers import AutoTokenizer

    from vtrans.budget import parse_target
    from vtrans.data import Encoded, load_table
    from vtrans.methods.base import Job

    ckpt = write_tiny_checkpoint(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    table = load_table(str(write_sentiment_csv(tmp_path / "train.csv", rows=200)))
    train = Encoded(table, tokenizer, {"0": 0, "1": 1}, max_length=16)
    models = {}

    def make(method, target="flops=0.5", family="bert", **kw):
        if family not in models:  # the same teacher and student for every Job of a family
            teacher = tiny_model(family).requires_grad_(False)
            teacher.config.num_labels = TINY["num_labels"]
            models[family] = teacher, copy.deepcopy(teacher)
        teacher, student = models[family]
        return Job(method=method, model=student, adapter=adapter_for(student), teacher=teacher,
                   budget=parse_target(target, 16), train=train, batch_size=16, **kw)
    return make


def checkpointed_phase(state) -> str | None:
    """The phase of a run's latest checkpoint file, or None before the first (the file is replaced atomically)."""
    if not state.exists():
        return None
    return torch.load(state, map_location="cpu", weights_only=True)["phase"]


def kill_once_checkpointed(process, state, phase: str, marker: str, timeout: float = 120) -> None:
    """SIGKILL every process whose command line holds `marker` (the run and, under torchrun, its workers, which
    live in sessions of their own) once the run's checkpoint `state` is of `phase`, or `process` ended."""
    deadline, seen = time.time() + timeout, None
    while process.poll() is None and time.time() < deadline:
        written = state.stat().st_mtime_ns if state.exists() else None
        if written != seen:  # read the file only when it changed: loading it takes the run's CPU
            seen = written
            if checkpointed_phase(state) == phase:
                break
        time.sleep(0.02)
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # not a process, or one that just ended
            continue
        if marker in command and entry.name.isdigit():
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except OSError:  # ended meanwhile, or not ours to kill
                pass
    process.wait()
