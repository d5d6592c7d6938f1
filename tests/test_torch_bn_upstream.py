"""PyTorch's own BatchNorm tests, ported to bnlib's modules.

* The generic module tests of PyTorch's ``test/test_modules.py`` (class ``TestModule``), driven by the
  BatchNorm1d/2d/3d entries of ``torch.testing._internal.common_modules.module_db`` exactly as upstream,
  with bnlib's class substituted for torch's (``module_info.module_cls`` -> ``_BNLIB[...]``).
* The BatchNorm tests of PyTorch's ``test/test_nn.py`` (``TestNN``, ``TestNNDeviceType``) that run on CPU,
  with ``nn.BatchNorm*d`` -> bnlib's class and ``F.batch_norm`` -> ``bnlib.torch_bn.batch_norm``.

Each port cites its upstream test.  Upstream's ``TestCase.assertEqual`` is ``torch.testing.assert_close``
here (the same dtype-based default tolerances); upstream seeds every test in ``setUp``, here an autouse
fixture does.  Devices: cpu always, cuda when ``torch.cuda.is_available()`` (CUDA-only ports are generated
only then).  Every test runs on both paths of ``batch_norm`` (the ``both_bn_paths`` fixture, tests/conftest.py).

Not ported, and why:
* cuDNN/CUDA-against-CPU backend comparisons: they need CUDA;
* the SyncBatchNorm tests: upstream's need CUDA and NCCL (``bnlib.sync_bn`` is tested on gloo in
  ``tests/test_sync_bn.py``);
* ``test_check_inplace``: bnlib's modules have no ``inplace`` argument, as torch's BatchNorm has none;
* AOT/functorch fusion tests: they test torch's compiler passes, not the module;
* ``common_nn``'s ``NewModuleTest`` entries: the same inputs as ``module_db``'s, already run above.

``torch.testing._internal.common_utils`` imports ``expecttest`` (a test-only dependency of PyTorch that this
project does not install); a stub module stands in for it, and the global ``torch.backends`` flag switch
that ``common_utils`` turns off at import is turned back on, so other test files are not affected.
"""

from __future__ import annotations

import io
import pickle
import sys
import tempfile
import types
import unittest
from inspect import isgenerator
from copy import deepcopy
from itertools import chain, product
from unittest.mock import call, patch

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn

if "expecttest" not in sys.modules:  # see the module docstring
    _stub = types.ModuleType("expecttest")
    _stub.TestCase = unittest.TestCase
    sys.modules["expecttest"] = _stub
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402
from torch.testing._internal.common_utils import (  # noqa: E402
    freeze_rng_state,
    get_tensors_from,
    gradcheck,
    gradgradcheck,
    mock_wrapper,
)

torch.backends.__dict__["__allow_nonbracketed_mutation_flag"] = True  # undo disable_global_flags()

from bnlib import torch_bn as tb  # noqa: E402

_BNLIB = {nn.BatchNorm1d: tb.BatchNorm1d, nn.BatchNorm2d: tb.BatchNorm2d, nn.BatchNorm3d: tb.BatchNorm3d}
MODULE_INFOS = [m for m in module_db if m.module_cls in _BNLIB]
assert [m.name for m in MODULE_INFOS] == ["nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

device_p = pytest.mark.parametrize("device", DEVICES)
module_p = pytest.mark.parametrize("module_info", MODULE_INFOS, ids=lambda m: m.name)
training_p = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
# @modules(module_db) runs each test for module_info.dtypes (floating_types(): float32, float64)
dtype_p = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])

# every test runs on both paths of batch_norm: the speed path and the readable Function alone
pytestmark = pytest.mark.usefixtures("one_torch_thread", "both_bn_paths")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # upstream: TestCase.setUp seeds every test


def _inputs(module_info, device, dtype, requires_grad, training):
    return module_info.module_inputs_func(module_info, device=device, dtype=dtype,
                                          requires_grad=requires_grad, training=training)


def _assert_module_parameters_and_buffer_are(module, device, dtype):
    # upstream TestModule._assert_module_parameters_and_buffer_are
    device = torch.device(device)
    for item_name, item in chain(module.named_parameters(), module.named_buffers()):
        assert item.device == device, item_name
        if item.dtype.is_floating_point:
            assert item.dtype == dtype, item_name


def _traverse_obj(obj, func):
    # upstream TestModule._traverse_obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_traverse_obj(o, func) for o in obj)
    elif isgenerator(obj):
        return tuple(_traverse_obj(o, func) for o in obj)
    elif isinstance(obj, dict):
        return {name: _traverse_obj(o, func) for name, o in obj.items()}
    elif isinstance(obj, (torch.Tensor, torch.nn.Parameter)):
        return func(obj)


# ==================================================================== test/test_modules.py (TestModule)
# test_modules.py::TestModule::test_forward
@device_p
@module_p
@training_p
@dtype_p
def test_forward(device, dtype, module_info, training):
    module_cls = _BNLIB[module_info.module_cls]
    dtype_to_method_caller = {torch.float32: "float", torch.float64: "double"}
    for module_input in _inputs(module_info, device, dtype, False, training):
        with freeze_rng_state():
            args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
            m = module_cls(*args, **kwargs)
            m.to(device).to(dtype)
            m.train(training)
            args, kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
            outputs = m(*args, **kwargs)
            assert module_input.reference_fn is None  # BatchNorm entries have none upstream
            # added for the port: the same forward by torch's own class is the reference
            ref = module_info.module_cls(*module_input.constructor_input.args,
                                         **module_input.constructor_input.kwargs).to(device).to(dtype)
            ref.train(training)
            torch.testing.assert_close(outputs, ref(*args, **kwargs))
            getattr(m, dtype_to_method_caller[dtype])()
            m(*args, **kwargs)
            _assert_module_parameters_and_buffer_are(m, device, dtype)


# test_modules.py::TestModule::test_factory_kwargs
@device_p
@module_p
@training_p
@dtype_p
def test_factory_kwargs(device, dtype, module_info, training):
    module_cls = _BNLIB[module_info.module_cls]
    for module_input in _inputs(module_info, device, dtype, False, training):
        args, kwargs = module_input.constructor_input.args, dict(module_input.constructor_input.kwargs)
        module_creates_params_or_buffers = False
        parameter_new = mock_wrapper(torch.nn.Parameter.__new__)
        with patch.object(torch.nn.Parameter, "__new__", parameter_new):
            register_buffer = mock_wrapper(torch.nn.Module.register_buffer)
            with patch.object(torch.nn.Module, "register_buffer", register_buffer):
                m = module_cls(*args, **kwargs)
                m.train(training)
                constructor_tensors = get_tensors_from(args, kwargs)
                for mock in [parameter_new.mock, register_buffer.mock]:
                    for call_args, call_kwargs in mock.call_args_list:
                        call_tensors = get_tensors_from(call_args, call_kwargs)
                        if len(call_tensors) > 0 and not constructor_tensors.intersection(call_tensors):
                            module_creates_params_or_buffers = True
                            break
        assert module_creates_params_or_buffers  # every BatchNorm entry creates some
        kwargs.update({"device": device, "dtype": dtype})
        m = module_cls(*args, **kwargs)
        m.train(training)
        _assert_module_parameters_and_buffer_are(m, device, dtype)


# test_modules.py::TestModule::test_repr
@device_p
@module_p
@training_p
def test_repr(device, module_info, training):
    module_cls = _BNLIB[module_info.module_cls]
    for module_input in _inputs(module_info, device, torch.float32, False, training):
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        m = module_cls(*args, **kwargs)
        m.to(device)
        m.train(training)
        m.__repr__()
        str(m)
        assert repr(m) == repr(module_info.module_cls(*args, **kwargs).to(device))  # added: torch's repr


# test_modules.py::TestModule::test_pickle (torch.save / torch.load of the whole module), plus a
# plain pickle round trip and a state_dict round trip through torch's class (added)
@device_p
@module_p
@training_p
@dtype_p
def test_pickle(device, dtype, module_info, training):
    module_cls = _BNLIB[module_info.module_cls]
    for module_input in _inputs(module_info, device, dtype, False, training):
        with freeze_rng_state():
            args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
            m = module_cls(*args, **kwargs)
            m.to(device).to(dtype)
            m.train(training)
            f_args, f_kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
            output = m(*f_args, **f_kwargs)
            with tempfile.TemporaryFile() as f:
                torch.save(m, f)
                f.seek(0)
                m_copy = torch.load(f, weights_only=False)
                assert type(m_copy) is module_cls
                torch.testing.assert_close(m_copy(*f_args, **f_kwargs), output)
            m_copy = pickle.loads(pickle.dumps(m))
            torch.testing.assert_close(m_copy(*f_args, **f_kwargs), output)
            ref = module_info.module_cls(*args, **kwargs).to(device).to(dtype).train(training)
            buf = io.BytesIO()
            torch.save(m.state_dict(), buf)
            buf.seek(0)
            ref.load_state_dict(torch.load(buf), strict=True)
            torch.testing.assert_close(ref(*f_args, **f_kwargs), m(*f_args, **f_kwargs))


# test_modules.py::TestModule::test_non_contiguous_tensors
@device_p
@module_p
@training_p
@dtype_p
def test_non_contiguous_tensors(device, dtype, module_info, training):
    module_cls = _BNLIB[module_info.module_cls]

    def _make_non_contiguous(obj):
        def inner_make_non_contiguous(obj):
            if not isinstance(obj, torch.Tensor) or obj.dim() == 0:
                return obj
            out = torch.repeat_interleave(obj, 2, dim=-1)
            out = out[..., ::2].detach()
            out.requires_grad = obj.requires_grad
            return out
        return _traverse_obj(obj, inner_make_non_contiguous)

    def _retain_grad(obj):
        _traverse_obj(obj, lambda t: t.retain_grad() if t.requires_grad else None)

    def _get_grads(obj):
        return _traverse_obj(obj, lambda t: t.grad if t.requires_grad else None)

    def _zero_grad(obj):
        def inner(t):
            if t.grad is not None:
                t.grad = None
        _traverse_obj(obj, inner)

    for module_input in _inputs(module_info, device, dtype, True, training):
        input_args, input_kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        m = module_cls(*args, **kwargs)
        m.to(device).to(dtype)
        m.train(training)
        _retain_grad((input_args, input_kwargs))
        with freeze_rng_state():
            default_output = m(*input_args, **input_kwargs)
            grad_output = default_output.clone().detach_().normal_()
            default_output.backward(grad_output, retain_graph=True)
        default_input_args_grad, default_input_kwargs_grad = deepcopy(_get_grads((input_args, input_kwargs)))
        default_param_grad = deepcopy([p.grad for p in m.parameters()])
        nc_input_args, nc_input_kwargs = _make_non_contiguous((input_args, input_kwargs))
        nc_grad_output = _make_non_contiguous(grad_output)
        inputs = [(input_args, input_kwargs), (nc_input_args, nc_input_kwargs)]
        grads = [grad_output, nc_grad_output]
        for (in_args, in_kwargs), g_out in product(inputs, grads):
            g_out_copy = deepcopy(g_out)
            _zero_grad((in_args, in_kwargs))
            _zero_grad(m.parameters())
            with freeze_rng_state():
                out = m(*in_args, **in_kwargs)
                out.backward(g_out_copy, retain_graph=True)
            input_args_grad, input_kwargs_grad = _get_grads((in_args, in_kwargs))
            torch.testing.assert_close(out, default_output)
            torch.testing.assert_close(input_args_grad, default_input_args_grad, atol=1e-4, rtol=0)
            torch.testing.assert_close(input_kwargs_grad, default_input_kwargs_grad, atol=1e-4, rtol=0)
            param_grad = [p.grad for p in m.parameters()]
            torch.testing.assert_close(param_grad, default_param_grad)


def _test_gradients_helper(device, dtype, module_info, training, check):
    # upstream TestModule._test_gradients_helper; ``check`` is common_utils' gradcheck / gradgradcheck,
    # whose defaults are check_batched_grad=True and fast_mode=True (as upstream)
    module_cls = _BNLIB[module_info.module_cls]
    for module_input in _inputs(module_info, device, dtype, True, training):
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        m = module_cls(*args, **kwargs)
        m.to(device).to(dtype)
        m.train(training)
        params = tuple(m.parameters())
        input_args, input_kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
        other_kwargs = {}
        kwarg_tensors = []
        for name, obj in input_kwargs.items():
            if isinstance(obj, torch.Tensor):
                kwarg_tensors.append((name, obj))
            else:
                other_kwargs[name] = obj

        def fn_to_gradcheck(*flat_input_and_params):
            input_and_params = torch.utils._pytree.tree_unflatten(flat_input_and_params, flat_spec)
            new_input_args = input_and_params[:len(input_args)]
            kwarg_args = input_and_params[-len(kwarg_tensors):]
            new_kwargs = {name: obj for (name, _), obj in zip(kwarg_tensors, kwarg_args)}
            with freeze_rng_state():
                output = m(*new_input_args, **new_kwargs, **other_kwargs)
                output_flattened, _ = torch.utils._pytree.tree_flatten(output)
                return output_flattened

        grad_input = input_args + params + tuple(obj for (_, obj) in kwarg_tensors)
        flat_input, flat_spec = torch.utils._pytree.tree_flatten(grad_input)
        assert check(fn_to_gradcheck, flat_input, nondet_tol=0.0)
        # partial derivatives: one parameter at a time
        old_params_requires_grad = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad = False
        for p, old in zip(params, old_params_requires_grad):
            p.requires_grad = old
            grad_input = input_args + params + tuple(obj for (_, obj) in kwarg_tensors)
            flat_input, flat_spec = torch.utils._pytree.tree_flatten(grad_input)
            assert check(fn_to_gradcheck, flat_input, nondet_tol=0.0)
            p.requires_grad = False


# test_modules.py::TestModule::test_grad (allowed_dtypes=[torch.double])
@device_p
@module_p
@training_p
def test_grad(device, module_info, training):
    _test_gradients_helper(device, torch.float64, module_info, training, gradcheck)


# test_modules.py::TestModule::test_gradgrad (allowed_dtypes=[torch.double])
@device_p
@module_p
@training_p
def test_gradgrad(device, module_info, training):
    _test_gradients_helper(device, torch.float64, module_info, training, gradgradcheck)


# test_modules.py::TestModule::test_memory_format
@device_p
@module_p
@training_p
@dtype_p
def test_memory_format(device, dtype, module_info, training):
    module_cls = _BNLIB[module_info.module_cls]
    module_memformat_affects_out = module_info.module_memformat_affects_out

    def _get_mem_formats(channels_last=False, channels_last_3d=False):
        if channels_last:
            return ([torch.contiguous_format, torch.channels_last],
                    [torch.preserve_format, torch.contiguous_format, torch.channels_last])
        elif channels_last_3d:
            return ([torch.contiguous_format, torch.channels_last_3d],
                    [torch.preserve_format, torch.contiguous_format, torch.channels_last_3d])
        return [torch.contiguous_format], [torch.preserve_format, torch.contiguous_format]

    def _check_dims(obj, n):
        if isinstance(obj, torch.Tensor):
            return obj.dim() == n
        elif isinstance(obj, (tuple, list)):
            return any(_check_dims(o, n) for o in obj)
        return False

    def _to_mem_format(mem_format, obj):
        def inner_to_mem_format(obj):
            d = obj.dim()
            if (mem_format == torch.channels_last and d != 4) or (mem_format == torch.channels_last_3d and d != 5):
                return obj.clone().detach().requires_grad_(obj.requires_grad)
            return obj.clone().to(memory_format=mem_format).detach().requires_grad_(obj.requires_grad)
        return _traverse_obj(obj, inner_to_mem_format)

    def _check_out_mem_format(output, input_mem_format, module_mem_format):
        def inner_check_out_mem_format(output):
            d = output.dim()
            if d == 4 and ((input_mem_format == torch.channels_last)
                           or (module_mem_format == torch.channels_last and module_memformat_affects_out)):
                assert output.is_contiguous(memory_format=torch.channels_last)
            elif d == 5 and ((input_mem_format == torch.channels_last_3d)
                             or (module_mem_format == torch.channels_last_3d and module_memformat_affects_out)):
                assert output.is_contiguous(memory_format=torch.channels_last_3d)
            else:
                assert output.is_contiguous()
        return _traverse_obj(output, inner_check_out_mem_format)

    def _req_grad(t):
        return isinstance(t, torch.Tensor) and t.requires_grad

    for module_input in _inputs(module_info, device, dtype, True, training):
        supports_channels_last = _check_dims(module_input.forward_input.args, 4)
        supports_channels_last_3d = _check_dims(module_input.forward_input.args, 5)
        input_mem_formats, module_mem_formats = _get_mem_formats(supports_channels_last, supports_channels_last_3d)
        with freeze_rng_state():
            args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
            m = module_cls(*args, **kwargs)
            m.to(device).to(dtype)
            m.train(training)
            args, kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
            desired_outputs = m(*args, **kwargs)
            ref_diff_outputs = tuple(t for t in torch.utils._pytree.tree_flatten(desired_outputs)[0] if _req_grad(t))
            if training and len(ref_diff_outputs) > 0:
                params = tuple(p for p in m.parameters())
                ref_diff_inputs = tuple(t for t in torch.utils._pytree.tree_flatten((args, kwargs, params))[0]
                                        if _req_grad(t))
                ref_grad_outputs = tuple(torch.rand_like(t) for t in ref_diff_outputs)
                ref_grad_inputs = torch.autograd.grad(ref_diff_outputs, ref_diff_inputs,
                                                      grad_outputs=ref_grad_outputs)
            for input_mem_format in input_mem_formats:
                d_args = _to_mem_format(input_mem_format, module_input.forward_input.args)
                d_kwargs = _to_mem_format(input_mem_format, module_input.forward_input.kwargs)
                module_input.forward_input.args = d_args
                module_input.forward_input.kwargs = d_kwargs
                for module_mem_format in module_mem_formats:
                    m.to(memory_format=module_mem_format)
                    args, kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
                    outputs = m(*args, **kwargs)
                    if input_mem_format != torch.contiguous_format or module_mem_format != torch.contiguous_format:
                        torch.testing.assert_close(outputs, desired_outputs)
                    _check_out_mem_format(outputs, input_mem_format, module_mem_format)
                    diff_outputs = tuple(t for t in torch.utils._pytree.tree_flatten(outputs)[0] if _req_grad(t))
                    if training and len(diff_outputs) > 0:
                        params = tuple(p for p in m.parameters())
                        diff_inputs = tuple(t for t in torch.utils._pytree.tree_flatten((args, kwargs, params))[0]
                                            if _req_grad(t))
                        grad_outputs = tuple(torch.empty_like(t1).copy_(t2)
                                             for (t1, t2) in zip(diff_outputs, ref_grad_outputs))
                        grad_inputs = torch.autograd.grad(diff_outputs, diff_inputs, grad_outputs=grad_outputs)
                        if input_mem_format != torch.contiguous_format or module_mem_format != torch.contiguous_format:
                            torch.testing.assert_close(grad_inputs, ref_grad_inputs)
                        _check_out_mem_format(grad_inputs, input_mem_format, module_mem_format)


# test_modules.py::TestModule::test_if_train_and_eval_modes_differ (train_eval_mode=train_only)
@device_p
@module_p
def test_if_train_and_eval_modes_differ(device, module_info):
    module_cls = _BNLIB[module_info.module_cls]
    training_flag_read = False
    for module_input in _inputs(module_info, device, torch.float32, False, True):
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        m = module_cls(*args, **kwargs)
        m.to(device)
        m.train(True)
        delattr(m, "training")
        try:
            args, kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
            m(*args, **kwargs)
        except AttributeError as e:
            if "'training'" in str(e):
                assert module_info.train_and_eval_differ
                training_flag_read = True
            else:
                raise
    assert training_flag_read  # bnlib's forward reads self.training, as torch's does


# test_modules.py::TestModule::test_device_ctx_init (onlyCPU upstream)
@module_p
@training_p
def test_device_ctx_init(module_info, training):
    from torch._subclasses.meta_utils import assert_metadata_eq

    module_cls = _BNLIB[module_info.module_cls]
    module_inputs = _inputs(module_info, "cpu", torch.float32, False, training)
    with torch.device("meta"):
        module_inputs_meta = module_info.module_inputs_func(module_info, device=None, dtype=torch.float32,
                                                            requires_grad=False, training=training)
    for module_input, module_input_meta in zip(module_inputs, module_inputs_meta):
        c_args, c_kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        c_args_meta = module_input_meta.constructor_input.args
        c_kwargs_meta = module_input_meta.constructor_input.kwargs
        m_cpu = module_cls(*c_args, **c_kwargs)
        with torch.device("meta"):
            m = module_cls(*c_args_meta, **c_kwargs_meta)
        for p_meta, p_cpu in chain(zip(m.parameters(), m_cpu.parameters()), zip(m.buffers(), m_cpu.buffers())):
            assert p_meta.is_meta

            def _eq(a, b, msg=None):
                assert a == b, msg

            assert_metadata_eq(_eq, p_meta, p_cpu)


# test_modules.py::TestModule::test_errors (module_error_inputs_torch_nn_BatchNorm1d_2d_3d: eps 0 and -1)
@device_p
@module_p
@training_p
@dtype_p
def test_errors(device, dtype, module_info, training):
    module_cls = _BNLIB[module_info.module_cls]
    error_inputs = module_info.module_error_inputs_func(module_info, device=device, dtype=dtype,
                                                        requires_grad=False, training=training)
    assert len(error_inputs) == 2
    for error_input in error_inputs:
        module_input = error_input.module_error_input
        c_args, c_kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        assert error_input.error_on == ModuleErrorEnum.FORWARD_ERROR
        m = module_cls(*c_args, **c_kwargs)
        fw_args, fw_kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            m(*fw_args, **fw_kwargs)
        # added: the very message torch raises
        with pytest.raises(error_input.error_type) as want:
            module_info.module_cls(*c_args, **c_kwargs)(*fw_args, **fw_kwargs)
        with pytest.raises(error_input.error_type) as got:
            m(*fw_args, **fw_kwargs)
        assert str(got.value) == str(want.value)


# test_modules.py::TestModule::test_to (allowed_dtypes=[torch.float32], parametrized swap, set_grad)
@device_p
@module_p
@training_p
@pytest.mark.parametrize("swap", [True, False], ids=["swap", "noswap"])
@pytest.mark.parametrize("set_grad", [True, False], ids=["grad", "nograd"])
def test_to(device, module_info, training, swap, set_grad):
    module_cls = _BNLIB[module_info.module_cls]
    dtype = torch.float32
    devices = DEVICES
    dtypes = module_info.dtypes
    old_swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        for module_input in _inputs(module_info, device, dtype, False, training):
            c_args, c_kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
            args, kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
            m = module_cls(*c_args, **c_kwargs)

            def _to(m, set_grad=False):  # upstream: avoid module.to() when constructing
                for c in m.children():
                    _to(c, set_grad=set_grad)
                for n, p in m.named_parameters(recurse=False):
                    new_p = torch.nn.Parameter(p.detach().clone().to(device, dtype))
                    setattr(m, n, new_p)
                    if set_grad:
                        new_p.grad = torch.randn_like(new_p)
                for n, b in m.named_buffers(recurse=False):
                    setattr(m, n, b.detach().clone().to(device))

            _to(m, set_grad=set_grad)
            has_params = len(list(m.parameters())) > 0
            if swap and not set_grad and has_params:  # .to() after forward and backward, with swap
                out = m(*args, **kwargs)
                out.sum().backward()
                m.to(dtype=torch.half)
                m.to(dtype=torch.float32)
            prev_device, prev_dtype = device, dtype
            for device_, dtype_ in product(devices, dtypes):
                g_no_swap = device_ == prev_device and dtype_ == prev_dtype
                prev_device, prev_dtype = device_, dtype_
                p_ids_before = [id(p) for p in m.parameters()]
                p_cdatas_before = [p._cdata for p in m.parameters()]
                if set_grad:
                    g_ids_before = [id(p.grad) for p in m.parameters()]
                    g_cdatas_before = [p.grad._cdata for p in m.parameters()]
                m.to(device=device_, dtype=dtype_)
                assert all(isinstance(p, torch.nn.Parameter) for p in m.parameters())
                assert all(p.device.type == device_ for p in m.parameters())
                assert all(p.dtype == dtype_ for p in m.parameters())
                p_ids_after = [id(p) for p in m.parameters()]
                p_cdatas_after = [p._cdata for p in m.parameters()]
                if set_grad:
                    assert all(p.grad.device.type == device_ for p in m.parameters())
                    assert all(p.grad.dtype == dtype_ for p in m.parameters())
                    g_ids_after = [id(p.grad) for p in m.parameters()]
                    g_cdatas_after = [p.grad._cdata for p in m.parameters()]
                if swap:
                    assert all(a == b for a, b in zip(p_ids_before, p_ids_after))
                    assert all(a != b for a, b in zip(p_cdatas_before, p_cdatas_after))
                    if set_grad:
                        assert all(a == b if g_no_swap else a != b for a, b in zip(g_cdatas_before, g_cdatas_after))
                else:
                    assert all(a == b for a, b in zip(p_cdatas_before, p_cdatas_after))
                    assert all(a == b for a, b in zip(p_ids_before, p_ids_after))
                    if set_grad:
                        assert all(a == b for a, b in zip(g_cdatas_before, g_cdatas_after))
                        assert all(a == b for a, b in zip(g_ids_before, g_ids_after))
                # added: the converted module still computes like torch's
                if module_input.forward_input.args[0].numel() > 0:
                    x = module_input.forward_input.args[0].to(device_, dtype_)
                    ref = module_info.module_cls(*c_args, **c_kwargs).to(device_, dtype_)
                    ref.load_state_dict(m.state_dict())
                    ref.train(m.training)
                    torch.testing.assert_close(m(x), ref(x))
    finally:
        torch.__future__.set_swap_module_params_on_conversion(old_swap)


# test_modules.py::TestModule::test_to_empty (allowed_dtypes=[torch.float32], parametrized swap)
@device_p
@module_p
@training_p
@pytest.mark.parametrize("swap", [True, False], ids=["swap", "noswap"])
def test_to_empty(device, module_info, training, swap):
    module_cls = _BNLIB[module_info.module_cls]
    dtype = torch.float32
    with torch.device("meta"):
        module_inputs = module_info.module_inputs_func(module_info, device=None, dtype=dtype,
                                                       requires_grad=False, training=training)
    old_swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    device_ = torch.device(device)
    try:
        for module_input in module_inputs:
            c_args, c_kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
            with torch.device("meta"):
                m = module_cls(*c_args, **c_kwargs)
            p_ids_before = [id(p) for p in m.parameters()]
            p_cdatas_before = [p._cdata for p in m.parameters()]
            m.to_empty(device=device_)
            assert all(isinstance(p, torch.nn.Parameter) for p in m.parameters())
            assert all(p.device == device_ for p in m.parameters())
            assert all(p.dtype == dtype for p in m.parameters())
            p_ids_after = [id(p) for p in m.parameters()]
            p_cdatas_after = [p._cdata for p in m.parameters()]
            if swap:
                assert all(a == b for a, b in zip(p_ids_before, p_ids_after))
                assert all(a != b for a, b in zip(p_cdatas_before, p_cdatas_after))
            else:
                assert all(a != b for a, b in zip(p_ids_before, p_ids_after))
                assert all(a != b for a, b in zip(p_cdatas_before, p_cdatas_after))
            # added: after reset_parameters() the materialised module runs like torch's
            m.reset_parameters()
            ref = module_info.module_cls(*c_args, **c_kwargs).to(device_)
            spatial = {nn.BatchNorm1d: (), nn.BatchNorm2d: (3, 3), nn.BatchNorm3d: (2, 3, 3)}[module_info.module_cls]
            x = torch.randn(4, ref.num_features, *spatial, device=device_)
            m.train(training), ref.train(training)
            torch.testing.assert_close(m(x), ref(x))
    finally:
        torch.__future__.set_swap_module_params_on_conversion(old_swap)


if torch.cuda.is_available():  # the onlyCUDA tests exist only where CUDA does (no skipped placeholders)
    # test_modules.py::TestModule::test_cpu_gpu_parity (onlyCUDA): generated only when CUDA is available
    @pytest.mark.parametrize("device", ["cuda"])
    @module_p
    @training_p
    def test_cpu_gpu_parity(device, module_info, training):
        module_cls = _BNLIB[module_info.module_cls]
        for dtype, tol in ((torch.float32, 5e-2), (torch.float64, 4e-4)):
            for module_input in _inputs(module_info, "cpu", dtype, True, training):
                cpu_args = module_input.forward_input.args
                gpu_args = tuple(a.detach().to(device).requires_grad_(a.requires_grad) for a in cpu_args)
                for a in chain(cpu_args, gpu_args):
                    a.retain_grad()
                args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
                cpu_module = module_cls(*args, **kwargs).to(dtype).to("cpu").train(training)
                gpu_module = module_cls(*args, **kwargs).to(dtype).to(device).train(training)
                for cpu_p, gpu_p in zip(cpu_module.parameters(), gpu_module.parameters()):
                    gpu_p.data.copy_(cpu_p)
                cpu_out, gpu_out = cpu_module(*cpu_args), gpu_module(*gpu_args)
                torch.testing.assert_close(cpu_out, gpu_out.cpu(), rtol=tol, atol=0)
                for _ in range(5):
                    g = cpu_out.clone().normal_()
                    cpu_out.backward(g, retain_graph=True)
                    gpu_out.backward(g.to(device), retain_graph=True)
                    for a, b in zip(cpu_args, gpu_args):
                        torch.testing.assert_close(a.grad, b.grad.cpu(), rtol=tol, atol=0)
                    for cpu_p, gpu_p in zip(cpu_module.parameters(), gpu_module.parameters()):
                        torch.testing.assert_close(cpu_p.grad, gpu_p.grad.cpu(), rtol=tol, atol=0)
    
    
    # test_modules.py::TestModule::test_multiple_device_transfer (onlyCUDA): only when CUDA is available
    @pytest.mark.parametrize("device", ["cuda"])
    @module_p
    @training_p
    def test_multiple_device_transfer(device, module_info, training):
        module_cls = _BNLIB[module_info.module_cls]
        dtype = torch.float32
        for in_dev, in_cpu in zip(_inputs(module_info, device, dtype, False, training),
                                  _inputs(module_info, "cpu", dtype, False, training)):
            args, kwargs = in_dev.constructor_input.args, in_dev.constructor_input.kwargs
            m = module_cls(*args, **kwargs).to(device).to(dtype).train(training)
            m(*in_dev.forward_input.args)
            _assert_module_parameters_and_buffer_are(m, device, dtype)
            m.cpu()
            m(*in_cpu.forward_input.args)
            _assert_module_parameters_and_buffer_are(m, "cpu", dtype)
            m.cuda()
            m(*in_dev.forward_input.args)
            _assert_module_parameters_and_buffer_are(m, device, dtype)


# ======================================================== test/test_nn.py (TestNN, TestNNDeviceType)
def _module_empty_input(module, inp, check_size=True):
    # upstream test_nn.py::_test_module_empty_input
    inp.requires_grad_(True)
    out = module(inp)
    g_o = torch.rand_like(out)
    out.backward(g_o)
    if check_size:
        assert out.size() == inp.size()
    for p in module.parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, torch.zeros_like(p.grad))
    torch.testing.assert_close(inp.grad, torch.zeros_like(inp))


# test_nn.py::TestNN::test_batchnorm_nhwc_cpu (incl. float16/bfloat16, pure and "mixed", BatchNorm3d)
# (upstream loops over dtype in (float, bfloat16, float16) x mixed_dtype in (False, True), forcing mixed_dtype
# to False for float: five distinct cases)
@pytest.mark.parametrize("dtype,mixed_dtype", [(torch.float, False), (torch.bfloat16, False), (torch.bfloat16, True),
                                               (torch.float16, False), (torch.float16, True)],
                         ids=["float32", "bfloat16", "mixed-bfloat16", "float16", "mixed-float16"])
def test_batchnorm_nhwc_cpu(dtype, mixed_dtype):

    def helper(mod, size, dtype, mixed_dtype=False, format=torch.channels_last, precision=None):
        channels = size[1]
        input = torch.randn(size, dtype=dtype, device="cpu", requires_grad=True)
        input = input.contiguous(memory_format=format).to(dtype)
        input.retain_grad()
        grad = torch.randn(size, dtype=dtype, device="cpu")
        grad = grad.contiguous(memory_format=format)
        bn = mod(channels).cpu().to(dtype)
        bn.weight.data.uniform_()
        bn.bias.data.uniform_()
        ref_input = input.detach().clone().contiguous().requires_grad_(True)
        ref_grad = grad.detach().clone().contiguous()
        ref_bn = mod(channels).cpu().to(dtype)
        ref_bn.load_state_dict(bn.state_dict())
        if mixed_dtype:
            bn.float()
            ref_bn.float()
        out = bn(input)
        out.backward(grad)
        ref_out = ref_bn(ref_input)
        ref_out.backward(ref_grad)
        assert out.is_contiguous(memory_format=format)
        assert ref_out.is_contiguous()
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(bn.weight.grad, ref_bn.weight.grad, atol=precision, rtol=precision)
        torch.testing.assert_close(bn.bias.grad, ref_bn.bias.grad)
        torch.testing.assert_close(input.grad, ref_input.grad)

    for shape in [(4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1)]:
        helper(tb.BatchNorm2d, shape, dtype, mixed_dtype, torch.channels_last)
    precisons = {torch.float: 1e-4, torch.bfloat16: 1e-4, torch.float16: None}
    for shape in [(4, 8, 2, 10, 10), (4, 1, 2, 9, 9), (4, 9, 1, 1, 1)]:
        helper(tb.BatchNorm3d, shape, dtype, mixed_dtype, torch.channels_last_3d, precisons[dtype])


# test_nn.py::TestNN::test_batchnorm_non_contig_cpu
def test_batchnorm_non_contig_cpu():
    input = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).cpu()
    input = input.permute(0, 2, 1, 3)
    bn = tb.BatchNorm2d(2).cpu().float().eval()
    bn.weight.data.uniform_()
    bn.bias.data.uniform_()
    ref_input = input.detach().clone().contiguous()
    ref_bn = tb.BatchNorm2d(2).cpu().float().eval()
    ref_bn.load_state_dict(bn.state_dict())
    out = bn(input)
    ref_out = ref_bn(ref_input)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert ref_out.is_contiguous()
    torch.testing.assert_close(out, ref_out)


# test_nn.py::TestNNDeviceType::test_batchnorm_nonaffine_cuda_half_input (CUDA upstream; the same
# "mixed" rule holds on CPU, so it runs on every device here)
@device_p
@pytest.mark.parametrize("dtype", [torch.half, torch.bfloat16], ids=["float16", "bfloat16"])
def test_batchnorm_nonaffine_half_input(device, dtype):
    input = torch.randn(16, 3, 24, 24, dtype=dtype, device=device)
    m = tb.BatchNorm2d(3, affine=False).to(device).float()  # keep running stats in FP32
    output = m(input)
    assert output.dtype == input.dtype
    m.eval()
    output = m(input)
    assert output.dtype == input.dtype


# test_nn.py::TestNNDeviceType::test_batchnorm_raises_error_if_less_than_one_value_per_channel
@device_p
def test_batchnorm_raises_error_if_less_than_one_value_per_channel(device):
    x = torch.rand(10, device=device)[None, :, None]
    with pytest.raises(ValueError):
        tb.BatchNorm1d(10)(x)


# test_nn.py::TestNNDeviceType::test_batchnorm_raises_error_if_running_mean_is_not_same_size_as_input,
# ..._running_var_..., ..._weight_..., ..._bias_is_not_same_size_as_input (four upstream tests)
@device_p
@pytest.mark.parametrize("which", ["running_mean", "running_var", "weight", "bias"])
def test_batchnorm_raises_error_if_x_is_not_same_size_as_input(device, which):
    input = torch.rand(2, 10, device=device)
    for size in [9, 11]:
        kw = {"running_mean": torch.rand(10, device=device), "running_var": torch.rand(10, device=device)}
        kw[which] = nn.Parameter(torch.rand(size, device=device)) if which in ("weight", "bias") else torch.rand(
            size, device=device)
        with pytest.raises(RuntimeError):
            tb.batch_norm(input, kw.pop("running_mean"), kw.pop("running_var"), **kw)


# test_nn.py::TestNNDeviceType::test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad
@device_p
def test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad(device):
    args = (torch.randn(3, 2, 5, device=device), torch.randn(2, device=device), torch.randn(2, device=device))
    kwargs = {"training": False, "momentum": -1.2}
    for dual_indices in ((0,), (1,), (1, 2), (0, 1), (0, 1, 2)):
        tangents = tuple(torch.rand_like(x) for x in args)
        with fwAD.dual_level():
            duals = [fwAD.make_dual(primal, tangent) if i in dual_indices else primal
                     for i, (primal, tangent) in enumerate(zip(args, tangents))]
            msg = "batch_norm is not differentiable wrt running_mean and running_var"
            if (1 in dual_indices or 2 in dual_indices) and 0 in dual_indices:
                with pytest.raises(RuntimeError, match=msg):
                    tb.batch_norm(*duals, **kwargs)
            else:
                tb.batch_norm(*duals, **kwargs)


# test_nn.py::TestNNDeviceType::test_batchnorm_buffer_update_when_stats_are_not_tracked
@device_p
def test_batchnorm_buffer_update_when_stats_are_not_tracked(device):
    input_size = (32, 4)
    bn = tb.BatchNorm1d(input_size[1], track_running_stats=True).to(device)
    bn.track_running_stats = False
    num_batches = bn.num_batches_tracked.clone()
    running_mean = bn.running_mean.clone()
    running_var = bn.running_var.clone()
    _ = bn(torch.rand(input_size, device=device))
    assert torch.equal(num_batches, bn.num_batches_tracked)
    assert torch.equal(running_mean, bn.running_mean)
    assert torch.equal(running_var, bn.running_var)


# test_nn.py::TestNN::test_batchnorm_load_state_dict
def test_batchnorm_load_state_dict():
    bn = tb.BatchNorm2d(3)
    assert bn.state_dict()["num_batches_tracked"] == torch.tensor(0)
    bn.num_batches_tracked = torch.tensor(10)
    assert bn.state_dict()["num_batches_tracked"] == torch.tensor(10)
    empty_dict = {}
    bn.load_state_dict(empty_dict, strict=False)
    assert bn.state_dict()["num_batches_tracked"] == torch.tensor(10)
    with torch.device("meta"):
        meta_bn = tb.BatchNorm2d(3)
    assert meta_bn.num_batches_tracked.device == torch.device("meta")
    meta_bn.load_state_dict(empty_dict, assign=True, strict=False)
    assert meta_bn.state_dict()["num_batches_tracked"] == torch.tensor(0)


# test_nn.py::TestNNDeviceType::test_batchnorm_grad (_test_batchnorm_grad; _assertGradAndGradgradChecks
# of F.batch_norm, here bnlib's batch_norm)
@device_p
def test_batchnorm_grad(device):
    dtype = torch.double
    bs, n_feat, size_feat = 4, 5, 6
    input = torch.arange(bs * n_feat * size_feat, device=device, requires_grad=True,
                         dtype=dtype).view(bs, n_feat, size_feat)
    weight = torch.arange(1, n_feat + 1, device=device, requires_grad=True, dtype=dtype)
    bias = torch.arange(n_feat, device=device, requires_grad=True, dtype=dtype)
    running_mean = 1 - torch.arange(n_feat, device=device, dtype=dtype)
    running_var = 2 * torch.arange(n_feat, device=device, dtype=dtype)
    for training in [False, True]:
        args = (input, running_mean, running_var, weight, bias, training, 0.1, 0.0001)
        assert gradcheck(tb.batch_norm, args)
        assert gradgradcheck(tb.batch_norm, args)


def _batchnorm_eval(ndim, device, dtype, module_dtype=None):
    # upstream test_nn.py::TestNNDeviceType::_test_batchnorm_eval
    module_dtype = module_dtype or dtype
    module = tb.BatchNorm1d(3).to(device, module_dtype)
    module.eval()
    data = torch.rand([3] * ndim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.rand([3] * ndim, device=device, dtype=dtype)
    res1 = module(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    if data.grad is not None:
        data.grad.data.zero_()
    res2 = module(data)
    res2.backward(grad)
    grad2 = data.grad.clone()
    torch.testing.assert_close(res1, res2)
    torch.testing.assert_close(grad1, grad2)
    # track_running_stats=False
    module = tb.BatchNorm1d(3, track_running_stats=False).to(device, module_dtype)
    data = torch.rand(4, 3, device=device, dtype=dtype, requires_grad=True)
    grad = torch.rand(4, 3, device=device, dtype=dtype)
    res1 = module(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    module.eval()
    if data.grad is not None:
        data.grad.data.zero_()
    res2 = module(data)
    res2.backward(grad)
    grad2 = data.grad.clone()
    torch.testing.assert_close(res1, res2)
    torch.testing.assert_close(grad1, grad2)


# test_nn.py::TestNNDeviceType::test_batchnorm_eval (float32; bfloat16 on CUDA upstream) and
# ::test_batchnorm_eval_mixed (bfloat16/float16 input, float32 module; CUDA upstream, every device here)
@device_p
@pytest.mark.parametrize("dtype,module_dtype", [(torch.float, None), (torch.bfloat16, None),
                                                (torch.bfloat16, torch.float), (torch.half, torch.float)],
                         ids=["float32", "bfloat16", "mixed-bfloat16", "mixed-float16"])
def test_batchnorm_eval(device, dtype, module_dtype):
    _batchnorm_eval(2, device, dtype, module_dtype)
    _batchnorm_eval(3, device, dtype, module_dtype)


def _batchnorm_affine(ndim, device, dtype, module_dtype=None):
    # upstream test_nn.py::TestNNDeviceType::_test_batchnorm_affine
    module_dtype = module_dtype or dtype
    module = tb.BatchNorm1d(3, affine=False).to(device, module_dtype)
    module_affine = tb.BatchNorm1d(3, affine=True).to(device, module_dtype)
    with torch.no_grad():
        module_affine.weight.fill_(1.0)
        module_affine.bias.zero_()
    data = torch.rand([3] * ndim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.ones_like(data, requires_grad=False)
    res1 = module_affine(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    data.grad.zero_()
    res2 = module(data)
    res2.backward(grad)
    grad2 = data.grad
    torch.testing.assert_close(res1, res2)
    torch.testing.assert_close(grad1, grad2)


# test_nn.py::TestNNDeviceType::test_batchnorm_affine and ::test_batchnorm_affine_mixed (CUDA upstream)
@device_p
@pytest.mark.parametrize("dtype,module_dtype", [(torch.float, None), (torch.bfloat16, None),
                                                (torch.bfloat16, torch.float), (torch.half, torch.float)],
                         ids=["float32", "bfloat16", "mixed-bfloat16", "mixed-float16"])
def test_batchnorm_affine(device, dtype, module_dtype):
    _batchnorm_affine(2, device, dtype, module_dtype)
    _batchnorm_affine(3, device, dtype, module_dtype)


def _batchnorm_simple_average(device, dtype, module_dtype=None):
    # upstream test_nn.py::TestNNDeviceType::_test_batchnorm_simple_average
    module_dtype = module_dtype or dtype
    module = tb.BatchNorm1d(3, momentum=None).to(dtype=module_dtype, device=device)
    zeros = torch.zeros(3, dtype=module_dtype, device=device)
    ones = torch.ones(3, dtype=module_dtype, device=device)
    torch.testing.assert_close(module.running_mean, zeros)
    torch.testing.assert_close(module.running_var, ones)
    data1 = torch.rand(4, 3, dtype=dtype, device=device)
    data2 = torch.rand(4, 3, dtype=dtype, device=device)
    res1 = module(data1)
    running_mean1 = module.running_mean.clone()
    running_var1 = module.running_var.clone()
    assert not torch.equal(running_mean1, zeros)
    assert not torch.equal(running_var1, ones)
    module.reset_running_stats()
    torch.testing.assert_close(module.running_mean, zeros)
    torch.testing.assert_close(module.running_var, ones)
    res2 = module(data2)
    running_mean2 = module.running_mean.clone()
    running_var2 = module.running_var.clone()
    assert not torch.equal(running_mean2, zeros)
    assert not torch.equal(running_var2, ones)
    module.reset_running_stats()
    torch.testing.assert_close(module.running_mean, zeros)
    torch.testing.assert_close(module.running_var, ones)
    res3 = module(data1)
    res4 = module(data2)
    torch.testing.assert_close(res3, res1)
    torch.testing.assert_close(res4, res2)
    torch.testing.assert_close(module.running_mean, (running_mean1 + running_mean2) / 2)
    torch.testing.assert_close(module.running_var, (running_var1 + running_var2) / 2)


# test_nn.py::TestNNDeviceType::test_batchnorm_simple_average (float32, bfloat16) and
# ::test_batchnorm_simple_average_mixed (CUDA upstream, every device here)
@device_p
@pytest.mark.parametrize("dtype,module_dtype", [(torch.float, None), (torch.bfloat16, None),
                                                (torch.bfloat16, torch.float), (torch.half, torch.float)],
                         ids=["float32", "bfloat16", "mixed-bfloat16", "mixed-float16"])
def test_batchnorm_simple_average(device, dtype, module_dtype):
    _batchnorm_simple_average(device, dtype, module_dtype)


# test_nn.py::TestNNDeviceType::test_batchnorm_update_stats (_test_batchnorm_update_stats)
@device_p
def test_batchnorm_update_stats(device):
    dtype = torch.float
    module = tb.BatchNorm1d(3).to(device, dtype)
    data = torch.rand(4, 3, device=device, dtype=dtype)
    old_running_mean = module.running_mean.clone()
    old_running_var = module.running_var.clone()
    old_num_batches_tracked = module.num_batches_tracked.clone()
    module(data)
    assert not torch.equal(old_running_mean, module.running_mean)
    assert not torch.equal(old_running_var, module.running_var)
    torch.testing.assert_close(old_num_batches_tracked + 1, module.num_batches_tracked)
    module.eval()
    old_running_mean = module.running_mean.clone()
    old_running_var = module.running_var.clone()
    old_num_batches_tracked = module.num_batches_tracked.clone()
    module(data)
    torch.testing.assert_close(old_running_mean, module.running_mean)
    torch.testing.assert_close(old_running_var, module.running_var)
    torch.testing.assert_close(old_num_batches_tracked, module.num_batches_tracked)


# test_nn.py::TestNNDeviceType::test_BatchNorm_empty
@device_p
def test_BatchNorm_empty(device):
    dtype = torch.double
    mod = tb.BatchNorm2d(3).to(device)
    inp = torch.randn(0, 3, 2, 2, device=device, dtype=dtype)
    # upstream leaves the module in float32 and feeds a float64 empty batch: an empty batch is returned
    # before any dtype check, so that works in torch, and must in bnlib
    _module_empty_input(mod, inp)
    torch.testing.assert_close(mod.running_mean, torch.tensor([0.0, 0, 0], device=device))
    torch.testing.assert_close(mod.running_var, torch.tensor([1.0, 1, 1], device=device))
    torch.testing.assert_close(mod.weight.grad, torch.tensor([0.0, 0, 0], device=device))
    torch.testing.assert_close(mod.bias.grad, torch.tensor([0.0, 0, 0], device=device))


# test_nn.py::TestNNDeviceType::test_batchnorm_nhwc_cuda (CUDA upstream; eval-mode contiguous vs
# channels_last must be bit-identical, which holds for bnlib on every device)
@device_p
@pytest.mark.parametrize("dtype", [torch.half, torch.float], ids=["float16", "float32"])
def test_batchnorm_nhwc(device, dtype):
    (N, C, H, W) = 2, 64, 50, 50
    model = tb.BatchNorm2d(C, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    model = model.eval().to(device).to(dtype)
    inp1 = torch.randn(N, C, H, W, device=device, dtype=dtype)
    inp2 = inp1.contiguous(memory_format=torch.channels_last)
    out1 = model(inp1)
    out2 = model(inp2)
    assert torch.equal(out1, out2)
