"""What the public can do to a served Bento: /livez while 48 long-history chats run, and /chat throughput with API
keys and a per-client rate limit on against off.

    python -m bench.public --model demo-bot                  # both, on the champion's Bento
    python -m bench.public --bento castbot-chat:TAG --only livez

livez: 48 concurrent /chat requests, each with 50 history turns of 1,000 characters (about 51 KB, inside the 64 KiB
limit) and 8 new tokens, while /livez is asked every 50 ms; prints the slowest and the 99th percentile /livez answer
(goal: under 1 s; Kubernetes' liveness probe gives up after 5 s). access: the held-out demo chats from 32 clients,
keys and a rate limit set high enough to refuse nothing (the cost of checking), alternated on/off twice.
"""

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.serve_throughput import champion_bento, free_port, held_out_chats, print_ratio, serve_and_measure
from bench.timing import percentile

KEYS = {"CASTBOT_API_KEYS": "bench:bench-key,other:other-key", "CASTBOT_RATE_LIMIT": "1000000/minute"}
BEARER = {"Authorization": "Bearer bench-key"}


def long_chat(i: int) -> dict:
    """50 history turns of 1,000 characters: the most a default service accepts, about 51 KB."""
    words = f"turn {i} of a long conversation about portal fluid and the council of ricks ".split()
    text = " ".join(words[j % len(words)] for j in range(400))[:1000]
    history = [{"speaker": "user" if t % 2 else "bot", "text": text} for t in range(50)]
    return {"history": history, "message": f"so what now, number {i}?", "max_new_tokens": 8}


def start(bento: str, env: dict[str, str], folder: Path) -> tuple[str, subprocess.Popen]:
    """`bentoml serve` on a free port, logging beside a fresh chat log; (url, process) once /readyz answers."""
    import httpx

    port = free_port()
    env = {**os.environ, "CASTBOT_CHATLOG_URL": f"sqlite:///{folder}/chatlog.db", **env}
    with (folder / "serve.log").open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("bentoml")), "serve", bento, "--host",
                                 "127.0.0.1", "--port", str(port)], cwd=folder, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited:\n{(folder / 'serve.log').read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("bentoml serve was not ready in 180 s")


async def livez_under_long_chats(url: str, chats: int = 48) -> dict:
    """Send `chats` long-history chats at once and time /livez every 50 ms until they are answered."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=chats + 4)) as http:
        load = asyncio.gather(*(http.post("/chat", json=long_chat(i)) for i in range(chats)))
        task, probes = asyncio.ensure_future(load), []
        started = time.monotonic()
        while not task.done():
            t0 = time.monotonic()
            resp = await http.get("/livez")
            probes.append(time.monotonic() - t0)
            assert resp.status_code == 200, resp.status_code
            await asyncio.sleep(0.05)
        answers = task.result()
    codes = sorted({r.status_code for r in answers})
    return {"seconds": time.monotonic() - started, "probes": len(probes), "max_s": max(probes),
            "p99_s": percentile(probes, 0.99), "codes": codes}


def livez(bento: str) -> None:
    folder = Path(tempfile.mkdtemp(prefix="castbot-public-"))
    url, proc = start(bento, {}, folder)
    try:
        result = asyncio.run(livez_under_long_chats(url))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"48 chats x 50 turns x 1,000 characters answered in {result['seconds']:.1f} s (HTTP {result['codes']}); "
          f"/livez {result['probes']} probes: max {result['max_s'] * 1000:.0f} ms, p99 {result['p99_s'] * 1000:.0f} ms")
    print(f"summary: livez_max_s={result['max_s']:.3f} (goal < 1.0)")


def access(bento: str, args) -> None:
    chats = held_out_chats()
    runs = [serve_and_measure(f"served, keys {'on' if on else 'off'}", bento, "auto", True, chats, args,
                              stream=False, extra_env=KEYS if on else None, headers=BEARER if on else None)
            for on in (True, False, True, False)]
    print_ratio(runs, "keys_on/keys_off", 0.97)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.public", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="Registered model whose champion's Bento to serve, e.g. demo-bot.")
    which.add_argument("--bento", help="Bento tag, e.g. castbot-chat:abc123.")
    parser.add_argument("--only", choices=["livez", "access"], help="One of the two measurements.")
    parser.add_argument("--requests", type=int, default=128, help="Timed /chat requests per access phase.")
    parser.add_argument("--concurrency", type=int, default=32, help="Concurrent clients in the access phases.")
    parser.add_argument("--phase-timeout", type=float, default=180, help="Seconds before an access phase stops.")
    args = parser.parse_args(argv)
    args.dtype, args.torch_threads = "fast", 0  # what serve_and_measure passes to the server

    from castbot.common.settings import use_project_state

    use_project_state()
    bento = args.bento or champion_bento(args.model)
    print(f"bento {bento}", flush=True)
    if args.only in (None, "livez"):
        livez(bento)
    if args.only in (None, "access"):
        access(bento, args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
