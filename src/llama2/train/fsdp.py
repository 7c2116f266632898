"""Fully sharded data parallel training (torch's FSDP2, `torch.distributed.fsdp.fully_shard`) of a
Transformer under torchrun: each process keeps 1/N of every weight, gradient and optimizer moment.

ckpt.pt is the same file with or without FSDP: the shards are gathered whole on rank 0's CPU
(torch.distributed.checkpoint.state_dict, full_state_dict) and the optimizer's state is saved in
`optimizer.state_dict()`'s form (parameters by index), so either kind of run resumes the other's.
"""

from itertools import chain

import torch

from .model import Transformer, rope_buffers


def import_before_init():
    """FSDP's modules, imported before init_process_group: imported after it, some take the default
    group as a default argument and hold it for good (trainer._init_dist says what that costs)."""
    import torch.distributed.checkpoint.state_dict  # noqa: F401
    import torch.distributed.device_mesh  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401


def mesh(device: str, world: int):
    """The one-dimensional mesh of the job's `world` processes on `device`'s kind (cpu, cuda)."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(torch.device(device).type, (world,))


def release(mesh):
    """Let destroy_process_group free the job's process group, and with it gloo's threads (which
    otherwise run into interpreter exit: trainer._init_dist). Two things hold it after training:
    the sharded model, whose FSDP state sits in reference cycles (hooks that refer to their module)
    until the cycle collector runs; and the mesh, kept for the life of the process by DTensor's
    caches (sharding rules, redistribution plans, mesh topology), through its registry of groups.
    The mesh is not used again."""
    import gc

    gc.collect()
    mesh._pg_registry.clear()


def shard(model: Transformer, mesh) -> Transformer:
    """Shard `model` (in place) over `mesh`: each block is a group whose weights are gathered just
    for its forward and backward, then the root holds the rest (embedding, final norm, classifier;
    a tied classifier is the embedding, sharded once). Each process's shards move to the mesh's
    device one block at a time, so the whole model never has to fit there."""
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def gather(model: Transformer, optimizer) -> tuple:
    """(a plain Transformer on the CPU holding the whole weights, the optimizer's whole state in
    optimizer.state_dict()'s form) on rank 0; (None, None) on the others. Every process must call
    it: the shards are gathered with collectives."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 alone gets the tensors
    state = get_model_state_dict(model, options=whole)
    optim = get_optimizer_state_dict(model, optimizer, options=whole)
    if not state:
        return None, None
    with torch.device("meta"):
        plain = Transformer(model.config, init=False)
    plain.load_state_dict(state, assign=True)  # the gathered tensors themselves, no copy
    _finish(plain)
    index = {name: i for i, name in enumerate(_names(model, optimizer))}
    # the groups' settings as the optimizer itself writes them (the gathered copy has lists for tuples)
    optim = {"state": {index[name]: value for name, value in optim["state"].items()},
             "param_groups": optimizer.state_dict()["param_groups"]}
    return plain, optim


def scatter(model: Transformer, optimizer, load_state_dict, model_state, optim_state):
    """Load ckpt.pt's `model_state` (read by the job's `load_state_dict(plain_model, state)`) and
    `optim_state` (optimizer.state_dict()'s form) into the sharded `model` and its optimizer; each
    process keeps its own shards of the whole tensors every process has read."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    with torch.device("meta"):
        plain = Transformer(model.config, init=False)
    plain.to_empty(device="cpu")  # uninitialized storage (no random init); load_state_dict fills it
    _finish(plain)
    load_state_dict(plain, model_state)
    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, plain.state_dict(), options=whole)
    names = _names(model, optimizer)
    by_name = {"state": {names[i]: value for i, value in optim_state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                for g in optim_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=whole)
    for group, saved in zip(optimizer.param_groups, optim_state["param_groups"]):  # its lists: tuples again
        group.update({key: value for key, value in saved.items() if key != "params"})


def _finish(plain: Transformer):
    """A Transformer made on the meta device: tie its classifier again (loading by assignment
    replaces each name's parameter on its own) and compute the RoPE tables (not in state dicts)."""
    if plain.config.shared_classifier:
        plain.output.weight = plain.tok_embeddings.weight
    plain.rope_cos, plain.rope_sin = rope_buffers(plain.config)


def _names(model, optimizer) -> list:
    """The parameters' names in the optimizer's order: index i of optimizer.state_dict() is names[i]."""
    name_of = {p: name for name, p in model.named_parameters()}
    return [name_of[p] for p in chain.from_iterable(g["params"] for g in optimizer.param_groups)]
