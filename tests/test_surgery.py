"""Masks, surgery, cost model and save/load on tiny models of every family, built from configs."""
import os
from pathlib import Path

import pytest
import torch
from conftest import random_kept, tiny_batch, tiny_model

from vtrans import load
from vtrans.arch import Kept, MaskValues, adapter_for, detach_masks
from vtrans.budget import exact_cost
from vtrans.surgery import atomic_directory, atomic_file, cut_model, masked_values, save, write_text


def masked_logits(model, adapter, z, hidden_keep, batch):
    values = MaskValues()
    handles = adapter.attach_masks(values)
    values.set(z, hidden_keep)
    try:
        with torch.no_grad():
            return model(**batch).logits
    finally:
        detach_masks(handles)


def random_scale(adapter, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: 0.5 + torch.rand(shape, generator=g) for n, shape in adapter.dims().mask_shapes().items()}


def test_all_ones_masks_reproduce_dense_logits(model_and_adapter):
    model, adapter = model_and_adapter
    batch = tiny_batch()
    with torch.no_grad():
        dense = model(**batch).logits
    z, hidden_keep = masked_values(Kept.dense(adapter.dims()), adapter.dims())
    # asked for gradients, the ones are applied by every hook (the masked norms included)
    asked = {name: value.clone().requires_grad_() for name, value in z.items()}
    masked = masked_logits(model, adapter, asked, hidden_keep, batch)
    assert torch.allclose(dense, masked, atol=1e-5), (dense - masked).abs().max()


def test_mask_values_of_exactly_one_are_not_applied(model_and_adapter, monkeypatch):
    """Ones asked for no gradient cost nothing (MaskValues.set): the norm hooks then leave the plain norm."""
    model, adapter = model_and_adapter
    batch = tiny_batch()
    dims = adapter.dims()
    z, hidden_keep = masked_values(Kept.dense(dims), dims)
    values = MaskValues()
    values.set(z, hidden_keep)
    assert values.z == {} and values.hidden_keep is None
    calls = []

    def counted_norm(norm, rms, x, keep):
        calls.append(keep)
        return x
    monkeypatch.setattr("vtrans.arch.base.masked_norm", counted_norm)
    with torch.no_grad():
        dense = model(**batch).logits
    assert torch.equal(masked_logits(model, adapter, z, hidden_keep, batch), dense) and not calls
    # one hidden dim dropped: the norms are masked again
    masked_logits(model, adapter, z, hidden_keep * (torch.arange(dims.hidden) > 0), batch)
    assert calls


@pytest.mark.parametrize("scaled", [True, False])
def test_surgery_gives_smaller_model_with_the_masked_logits(model_and_adapter, scaled):
    model, adapter = model_and_adapter
    batch = tiny_batch()
    kept = random_kept(adapter)
    scale = random_scale(adapter) if scaled else None
    z, hidden_keep = masked_values(kept, adapter.dims(), scale)
    expected = masked_logits(model, adapter, z, hidden_keep, batch)
    dense_params = sum(p.numel() for p in model.parameters())
    cut_model(adapter, kept, scale)
    with torch.no_grad():
        got = model(**batch).logits
    assert sum(p.numel() for p in model.parameters()) < dense_params
    assert (got - expected).abs().max() <= 1e-4


def test_cost_model_counts_the_real_parameters(model_and_adapter, family):
    model, adapter = model_and_adapter
    dims = adapter.dims()
    dense = exact_cost(adapter, Kept.dense(dims), seq_len=16)
    assert dense["params"] == sum(p.numel() for p in model.parameters())
    for seed in range(3):
        fresh = tiny_model(family)
        fresh_adapter = adapter_for(fresh)
        kept = random_kept(fresh_adapter, seed=seed, drop_blocks=seed != 1)
        predicted = exact_cost(fresh_adapter, kept, seq_len=16)["params"]
        cut_model(fresh_adapter, kept)
        assert predicted == sum(p.numel() for p in fresh.parameters())


def test_residual_norm_reads_the_stream_after_each_add(model_and_adapter):
    """The least-squares rescaling reads the residual stream just after each FFN add at Adapter.residual_norm:
    its input (pre-norm) or output (post-norm) is the layer's output the model reports in hidden_states."""
    model, adapter = model_and_adapter
    layers = adapter.dims().layers
    seen, attention_out = {}, {}
    hooks = [adapter.residual_norm(i, "ffn").register_forward_hook(
        lambda m, args, out, i=i: seen.__setitem__(i, (args[0], out))) for i in range(layers)]
    hooks += [adapter.residual_norm(i, "heads").register_forward_pre_hook(
        lambda m, args, i=i: seen.__setitem__((i, "heads"), args[0])) for i in range(layers)]
    hooks += [adapter.part(i, adapter.layer_parts.attention_output).register_forward_hook(
        lambda m, args, out, i=i: attention_out.__setitem__(i, out)) for i in range(layers)]
    try:
        with torch.no_grad():
            hidden_states = model(**tiny_batch(), output_hidden_states=True).hidden_states
    finally:
        detach_masks(hooks)
    post_norm = adapter.final_norm is None
    for i in range(layers - 1):  # the last layer's reported output may already be normed by the final norm
        stream, normed = seen[i]
        assert torch.allclose(normed if post_norm else stream, hidden_states[i + 1], atol=1e-6), i
    for i in range(layers):  # after the attention's add: the layer's input plus the attention's output
        assert torch.allclose(seen[(i, "heads")], hidden_states[i] + attention_out[i], atol=1e-6), i
    assert adapter.residual_norm(0, "heads") is not adapter.residual_norm(0, "ffn")


def test_flops_count_matches_a_hand_count():
    model = tiny_model("bert")
    adapter = adapter_for(model)
    c = model.config
    s, h, f, n_layers, labels = 16, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_labels
    per_layer = 2 * s * 4 * h * h + 2 * 2 * s * s * h + 2 * 2 * s * h * f
    expected = n_layers * per_layer + 2 * h * h + 2 * h * labels
    assert exact_cost(adapter, Kept.dense(adapter.dims()), s)["flops"] == expected


def test_save_and_load_round_trip_gives_the_same_logits(model_and_adapter, tmp_path):
    model, adapter = model_and_adapter
    batch = tiny_batch(seed=3)
    kept = random_kept(adapter, seed=2)
    cut_model(adapter, kept, random_scale(adapter))
    with torch.no_grad():
        before = model(**batch).logits
    save(model, None, tmp_path / "out", {"report.json": {"ok": True}})
    reloaded = load(tmp_path / "out")
    with torch.no_grad():
        after = reloaded(**batch).logits
    assert torch.equal(before, after)
    assert reloaded.config.vtrans["kept"] == kept.sizes()


def test_a_file_written_atomically_reaches_the_disk_before_its_name_moves(tmp_path, monkeypatch):
    path = tmp_path / "entry.json"
    write_text(path, "old")
    synced = []
    fsync = os.fsync

    def recording_fsync(descriptor):
        synced.append((Path(os.readlink(f"/proc/self/fd/{descriptor}")).name, path.read_text()))
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_text(path, "new")
    [(name, there)] = synced  # the new data, flushed while the name still held the old file
    assert name.startswith(".entry.json.") and there == "old" and path.read_text() == "new"
    synced.clear()
    with atomic_directory(tmp_path / "out") as partial:  # a directory: every file it holds, before it is renamed
        (partial / "sub").mkdir()
        (partial / "a.json").write_text("a")
        (partial / "sub" / "b.bin").write_bytes(b"b")
    assert sorted(name for name, _ in synced) == ["a.json", "b.bin"]


def test_a_file_written_atomically_is_whole_or_untouched(tmp_path):
    path = tmp_path / "cache" / "entry.json"
    write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_file(path) as partial:
        partial.write_text("half of the new")
        raise RuntimeError("the writer was interrupted")
    assert path.read_text() == "old" and [p.name for p in path.parent.iterdir()] == ["entry.json"]
    write_text(path, "new")
    assert path.read_text() == "new" and [p.name for p in path.parent.iterdir()] == ["entry.json"]
    plain = tmp_path / "plain.json"
    plain.write_text("new")
    assert path.stat().st_mode == plain.stat().st_mode  # readable as any file the user writes, not private
    path.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(path)
    write_text(link, "through the link")
    assert link.is_symlink() and path.read_text() == "through the link" and path.stat().st_mode & 0o777 == 0o640
