"""What bounds a request before any work, without Ray: images, JSON, bodies, turns, keys.

The HTTP tests (``test_hardening.py``) send the same shapes of input to a
running server; these check each piece alone, with many more examples.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time

import numpy as np
import pytest
from crafted import LARGEST, MAKERS, png
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlmlab.errors import LimitExceededError
from vlmlab.serving import KEY_LIMITS, ApiKey, KeysFileError, ServerLimits, add_key, load_keys
from vlmlab.serving._classifier import RequestError, decode_image, probe_image
from vlmlab.serving._keys import KeySlots, RateLimiter
from vlmlab.serving._limits import ascii_int, json_depth, parse_json, read_body
from vlmlab.serving._oracle_service import Answer, check_context_range, decode_array, plan_chunks
from vlmlab.serving._scheduler import FairScheduler


# ------------------------------------------------------------------ images
def _real_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 7, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_31_megapixel_image_is_refused_although_pillow_would_decode_it():
    """Pillow refuses only above twice its limit; the documented cap is exact now."""
    started = time.perf_counter()
    with pytest.raises(RequestError) as refused:
        decode_image(png(5600, 5600))  # 31.4 Mpx, a few dozen bytes on disk
    assert refused.value.status == 413 and "max_image_pixels = 16777216" in str(refused.value)
    assert refused.value.extra == {
        "limit": "max_image_pixels",
        "requested": 31_360_000,
        "allowed": 16_777_216,
    }
    assert time.perf_counter() - started < 0.5  # the header alone was read


@pytest.mark.parametrize("fmt", sorted(MAKERS))
def test_an_absurd_side_is_refused_from_the_header(fmt):
    data = MAKERS[fmt](1, min(LARGEST[fmt], 100_000))  # few pixels, one side absurd
    with pytest.raises(RequestError) as refused:
        probe_image(data)
    assert refused.value.status == 413 and refused.value.extra["limit"] == "max_image_side"
    if LARGEST[fmt] >= 2**30:  # a billion tall: over the pixel limit too, whichever says so
        with pytest.raises(RequestError) as refused:
            probe_image(MAKERS[fmt](1, 2**30))
        assert refused.value.status == 413 and refused.value.extra["limit"].startswith("max_image")


def test_limits_are_the_callers_and_decoding_gives_rgb():
    data = _real_png(40, 10)
    assert probe_image(data) == (40, 10)
    assert decode_image(data).shape == (10, 40, 3)
    with pytest.raises(RequestError, match="max_image_pixels = 399"):
        decode_image(data, max_pixels=399)
    with pytest.raises(RequestError, match="max_image_side = 39"):
        decode_image(data, max_side=39)


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"", 400, "empty"),
        (b"hello", 415, "not an image format served"),
        (_real_png(4, 4)[:50], 415, "truncated or corrupt"),
        (_real_png(4, 4)[:40], 415, "or cut short"),
        (b"P6\n4 4\n255\n" + b"\x00" * 48, 415, "not an image format served"),  # PPM: not served
    ],
    ids=["empty", "text", "truncated", "cut in the header", "ppm"],
)
def test_undecodable_images_are_4xx(data, status, message):
    with pytest.raises(RequestError, match=message) as refused:
        decode_image(data)
    assert refused.value.status == status


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # refused all the same
@settings(max_examples=150, deadline=2000, derandomize=True)
@given(
    fmt=st.sampled_from(sorted(MAKERS)),
    width=st.integers(-(2**31), 2**32 - 1),
    height=st.integers(-(2**31), 2**32 - 1),
    small=st.booleans(),
)
def test_fuzzed_image_headers_are_refused_or_decoded_never_an_exception(fmt, width, height, small):
    """Any size a header can claim: a 4xx or a small image, quickly, never another error."""
    if small:  # near the edges that matter: zero, one, the limits
        width, height = width % 9000, height % 9000
    width = max(0, min(width, LARGEST[fmt])) if fmt not in ("bmp",) else width
    height = max(0, min(height, LARGEST[fmt])) if fmt not in ("bmp",) else height
    try:
        data = MAKERS[fmt](width, height)
    except Exception:  # a header field this format cannot hold: nothing to send
        return
    try:
        pixels = decode_image(data)
    except RequestError as error:
        assert 400 <= error.status < 500
        return
    assert pixels.ndim == 3 and pixels.shape[0] * pixels.shape[1] <= 4096 * 4096


# -------------------------------------------------------------------- JSON
def test_deep_json_is_a_400_naming_the_depth():
    for depth in (33, 5_000, 200_000):  # past the limit; past Python's recursion limit
        with pytest.raises(RequestError, match="nested too deeply") as refused:
            parse_json(("[" * depth + "]" * depth).encode(), "{x}")
        assert refused.value.status == 400
    assert parse_json(json.dumps({"a": [[[1.0]]]}).encode(), "{a}") == {"a": [[[1.0]]]}
    assert json_depth({"a": [[[1.0]]]}) == 4 and json_depth(3) == 0


@pytest.mark.parametrize(
    "body",
    [b"1" * 5000, b'{"a": ' + b"9" * 5000 + b"}", b"\xff\xfe", b"{oops", b'{"a": 1e99999}x'],
    ids=["long int", "long int field", "not utf-8", "not json", "trailing"],
)
def test_unparsable_json_is_400(body):
    with pytest.raises(RequestError) as refused:
        parse_json(body, "{x}")
    assert refused.value.status == 400 and "not valid JSON" in str(refused.value)


@pytest.mark.parametrize(
    ("text", "value"),
    [("12", 12), (" 7 ", 7), ("²", None), ("١٢", None), ("1e3", None), ("-1", None), ("", None)],
)
def test_ascii_int_accepts_ascii_digits_only(text, value):
    assert ascii_int(text) == value
    assert ascii_int("9" * 19) is None  # no 4,300-digit conversions either


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"shape": [2**40, 2**40, 2**40], "float32_base64": ""}, "integers in"),
        ({"shape": [2**31, 1, 4], "float32_base64": "AAAA"}, r"integers in \[0, 1048576\]"),
        ({"shape": [2**20, 2**20, 2**20], "float32_base64": "AAAA"}, "do not hold"),
        ({"shape": [1] * 9, "float32_base64": "AAAA"}, "at most 8"),
        ([[[10**400]]], "rectangular nested list"),
        ([[["a"]]], "numbers only; found 'a'"),
        ([[["0.5"]]], "numbers only; found '0.5'"),
        ([[[" 1 "]]], "numbers only"),
        ([[["1_0"]]], "numbers only"),
        ([[["\u0661"]]], "numbers only"),
        ([[[1.0, True]]], r"numbers only; found True \(bool\)"),
        ([[[None]]], "numbers only"),
    ],
    ids=[
        "huge",
        "an axis of 2**31",
        "overflowing",
        "axes",
        "huge int",
        "text",
        "a number as text",
        "padded",
        "underscored",
        "arabic-indic digit",
        "a bool among floats",
        "null",
    ],
)
def test_arrays_that_cannot_be_built_are_422(value, message):
    with pytest.raises(RequestError, match=message) as refused:
        decode_array(value, "contexts")
    assert refused.value.status == 422


def test_contexts_beyond_fp16s_range_are_refused():
    check_context_range(np.full((1, 2, 4), 65504.0, np.float32))  # the largest fp16 passes
    for value in (3e38, -1e5):
        with pytest.raises(RequestError, match="beyond") as refused:
            check_context_range(np.full((1, 2, 4), value, np.float32))
        assert refused.value.status == 422


def test_an_empty_array_with_a_vast_axis_is_refused_cleanly():
    try:
        array, _ = decode_array({"shape": [0, 2**31, 2**31], "float32_base64": ""}, "contexts")
    except RequestError as error:
        assert error.status == 422
    else:
        assert array.size == 0  # numpy built it: validation refuses its shape later


# -------------------------------------------------------------------- bodies
def _receive(*messages, then_wait: float = 60.0):
    queue = list(messages)

    async def receive():
        if queue:
            delay, message = queue.pop(0)
            await asyncio.sleep(delay)
            return message
        await asyncio.sleep(then_wait)
        return {"type": "http.disconnect"}

    return receive


LIMITS = ServerLimits(body_timeout_s=0.6, body_idle_timeout_s=0.3, max_request_bytes=1024)


def _read(receive, length):
    return asyncio.run(read_body(receive, length, LIMITS))


def test_a_body_that_never_comes_is_408_after_the_idle_timeout():
    started = time.perf_counter()
    with pytest.raises(RequestError, match="did not arrive in time") as refused:
        _read(_receive(), 10)
    assert refused.value.status == 408 and time.perf_counter() - started < 0.5


def test_a_trickled_body_is_408_at_the_total_timeout():
    drip = [(0.2, {"type": "http.request", "body": b"x", "more_body": True})] * 10
    started = time.perf_counter()
    with pytest.raises(RequestError, match=r"[123] of 20 bytes"):
        _read(_receive(*drip), 20)  # each pause is under the idle timeout, the sum is not
    assert time.perf_counter() - started < 0.9


def test_bodies_must_match_their_length():
    parts = [
        (0, {"type": "http.request", "body": b"abc", "more_body": True}),
        (0, {"type": "http.request", "body": b"de", "more_body": False}),
    ]
    assert _read(_receive(*parts), 5) == b"abcde"
    with pytest.raises(RequestError, match="longer than its Content-Length"):
        _read(_receive(*parts), 4)
    with pytest.raises(RequestError, match="has 5 bytes"):
        _read(_receive(*parts), 6)
    with pytest.raises(asyncio.CancelledError):  # the client left: nothing to answer
        _read(_receive((0, {"type": "http.disconnect"})), 5)


# -------------------------------------------------------------------- turns
async def _order_of_turns(scheduler, requests):
    """Run (key, cost, start delay) pieces; return the keys in the order they got a turn."""
    order = []

    async def piece(key, cost, delay):
        await asyncio.sleep(delay)
        async with scheduler.turn(key, cost):
            order.append(key)
            await asyncio.sleep(0.01)

    await asyncio.gather(*(piece(*r) for r in requests))
    return order


def test_an_idle_key_goes_next_not_behind_a_busy_keys_backlog():
    # "hog" queues 20 chunks at once; "light" arrives a moment later with one.
    requests = [("hog", 100, 0.0)] * 20 + [("light", 100, 0.035)]
    order = asyncio.run(_order_of_turns(FairScheduler(1), requests))
    assert len(order) == 21 and order.index("light") <= 5  # FIFO would make it 21st


def test_busy_keys_share_turns_by_cost():
    # a: 12 pieces of cost 1; b: 12 of cost 3. While both wait, a gets about 3 turns per b's.
    requests = [("a", 1, 0.0)] * 12 + [("b", 3, 0.0)] * 12
    order = asyncio.run(_order_of_turns(FairScheduler(1), requests))
    first = order[:16]
    assert 10 <= first.count("a") <= 13 and 3 <= first.count("b") <= 6


def test_a_cancelled_waiter_gives_its_turn_away():
    async def scenario():
        scheduler = FairScheduler(1)
        holder = asyncio.Event()
        release = asyncio.Event()

        async def hold():
            async with scheduler.turn("a", 1):
                holder.set()
                await release.wait()

        async def wait():
            async with scheduler.turn("b", 1):
                return "b ran"

        first = asyncio.create_task(hold())
        await holder.wait()
        cancelled = asyncio.create_task(wait())
        later = asyncio.create_task(wait())
        await asyncio.sleep(0.01)
        assert scheduler.waiting == 2
        cancelled.cancel()
        release.set()
        assert await later == "b ran"
        await first
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        return scheduler.busy, scheduler.waiting

    assert asyncio.run(scenario()) == (0, 0)


@pytest.mark.parametrize(
    ("population", "classes", "chunk"), [(20, 10, 256), (3, 1000, 256), (7, 64, 64), (1, 1, 1)]
)
def test_chunks_cover_each_prompt_once_and_stay_small(population, classes, chunk):
    covered = np.zeros((population, classes), int)
    plan = plan_chunks(population, classes, chunk)
    for rows, columns in plan:
        covered[rows, columns] += 1
        assert (rows.stop - rows.start) * (columns.stop - columns.start) <= max(chunk, 1)
        if classes <= chunk:
            assert columns == slice(0, classes)  # whole candidates: computed as in-process
    assert (covered == 1).all()
    assert len(plan) == 1 if population * classes <= chunk else len(plan) > 1


# --------------------------------------------------------------------- keys
def test_a_logits_call_costs_rate_tokens_by_its_work(tmp_path):
    path = tmp_path / "keys.yaml"
    add_key(path, "metered", rate=1.0, burst=5)
    now = [0.0]
    limiter = RateLimiter(load_keys(path), clock=lambda: now[0])
    assert limiter.acquire("metered") == 0.0  # the request
    assert limiter.acquire("metered", 3) == 0.0  # + a call of 3,000 prompts
    assert limiter.acquire("metered", 2) == pytest.approx(1.0)  # one token left of five
    now[0] += 1.0
    assert limiter.acquire("metered", 2) == 0.0


def test_key_slots_bound_requests_in_progress(tmp_path):
    path = tmp_path / "keys.yaml"
    add_key(path, "two", max_concurrent=2)
    add_key(path, "other")
    slots = KeySlots(load_keys(path))
    assert slots.enter("two") and slots.enter("two") and not slots.enter("two")
    assert slots.enter("other")  # another key's slots are its own
    slots.leave("two")
    assert slots.enter("two") and slots.held("two") == 2


def test_per_key_limits_have_defaults_and_are_checked(tmp_path):
    path = tmp_path / "keys.yaml"
    add_key(path, "tight", max_classes=10, max_tokens=8)
    add_key(path, "plain")
    keys = load_keys(path)
    assert keys["tight"].max_classes == 10 and keys["tight"].max_tokens == 8
    assert keys["plain"].max_classes == ApiKey(sha256="0" * 64).max_classes == 1000
    assert "max_classes: 10" in path.read_text() and "max_prompts" not in path.read_text()
    assert set(KEY_LIMITS) <= set(ApiKey.model_fields)
    with pytest.raises(KeysFileError, match="unknown limit"):
        add_key(path, "x", max_clases=3)
    with pytest.raises(KeysFileError, match="max_classes"):
        add_key(path, "y", max_classes=0)


def test_limit_errors_name_the_limit_and_survive_pickling():
    import pickle

    error = LimitExceededError("max_classes", 1200, 1000, "class names in the call")
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, ValueError) and str(again) == str(error)
    assert (again.limit, again.requested, again.allowed) == ("max_classes", 1200, 1000)


def test_a_json_body_with_too_many_values_is_refused_before_parsing():
    body = json.dumps({"contexts": [[[0.5] * 100] * 10]}).encode()  # 1,000 numbers
    assert parse_json(body, "{contexts}", max_values=1000)["contexts"][0][9][99] == 0.5
    with pytest.raises(RequestError, match="max_json_values = 999") as refused:
        parse_json(body, "{contexts}", max_values=999)
    assert refused.value.status == 413 and refused.value.extra["limit"] == "max_json_values"


@pytest.mark.parametrize("shape", [(3, 50, 40), (2, 5000, 1), (7,), (1, 1, 1)])
def test_answers_render_as_json_would(shape):
    array = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    array.flat[0] = np.nan  # a model's overflow is sent, never a 500
    fields = {"shape": list(shape), "queries": 3}
    text = Answer(fields, "logits", array, binary=False).render()
    assert json.loads(text) == json.loads(json.dumps({"logits": array.tolist(), **fields}))
    sent = json.loads(Answer(fields, "logits", array, binary=True).render())
    back, binary = decode_array(sent["logits"], "logits")
    assert binary and np.array_equal(back, array, equal_nan=True) and sent["queries"] == 3
    assert json.loads(Answer({}, "embeddings", array, binary=False).render()).keys() == {
        "embeddings"
    }


def test_request_errors_cross_process_boundaries_whole():
    """Raised in a replica (a decoder, the registrar), a 4xx reaches the gateway as a 4xx."""
    import pickle

    error = RequestError(413, "too big", kind="LimitExceededError", extra={"limit": "x"})
    again = pickle.loads(pickle.dumps(error))
    assert (again.status, str(again), again.kind, again.extra) == (
        413,
        "too big",
        "LimitExceededError",
        {"limit": "x"},
    )


def test_a_set_lost_with_its_process_is_told_apart_from_other_failures():
    """Pixels gone with the registrar: 404 and register again; anything else: 503."""
    import ray.exceptions

    from vlmlab.serving._oracle_service import _lost

    gone = ray.exceptions.OwnerDiedError("a" * 56, None, "")
    assert _lost(gone) and _lost(ray.exceptions.RayTaskError("logits", "tb", gone))
    other = ray.exceptions.RayTaskError("logits", "tb", RuntimeError("boom"))
    assert not _lost(other) and not _lost(RuntimeError("boom"))


def test_refusals_are_paced_up_to_a_bound_and_nothing_else_waits():
    from vlmlab.serving._limits import RefusalPacer

    pacer = RefusalPacer(delay_s=0.3, capacity=2)

    async def timed(status: int) -> float:
        started = time.perf_counter()
        await pacer.pause(status)
        return time.perf_counter() - started

    async def scenario() -> tuple[list[float], float, int]:
        four = await asyncio.gather(*(timed(429) for _ in range(4)))
        return sorted(four), await timed(413), pacer.held

    four, mistake, held = asyncio.run(scenario())
    assert all(t < 0.1 for t in four[:2])  # past the capacity of 2: answered at once
    assert all(t >= 0.3 for t in four[2:])
    assert mistake < 0.1 and held == 0


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_the_registrars_decoding_threads_are_background_work():
    """Each decoding thread lowers its own priority (Linux keeps one per thread)."""
    import concurrent.futures

    from vlmlab.serving._registrar import lower_thread_priority

    with concurrent.futures.ThreadPoolExecutor(1, initializer=lower_thread_priority) as pool:
        assert pool.submit(os.sched_getscheduler, 0).result() == os.SCHED_IDLE
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the caller's own thread is untouched
