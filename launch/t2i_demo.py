"""The text-to-image demo: pictures from a prompt with a saved model's diffusion branch, from the command line or a
web page.

    python launch/t2i_demo.py --model runs/shapes-tiny/export "a red circle" --out grid.png [--images 4] \\
        [--negative "a blue square"] [--steps 20] [--guidance 3] [--seed 0]
    python launch/t2i_demo.py --model runs/shapes-tiny/export --serve       # the web page on 127.0.0.1:7861

The web page takes the prompt, negative prompt, steps, guidance, seed and number of pictures, shows the sampling's
progress and then the pictures. Picture k of a request uses seed + k, so a picture depends on its prompt and seed
only.
"""

import argparse
import threading
import uuid
from pathlib import Path

MAX_IMAGES, MAX_STEPS = 16, 200


def picture_grid(pictures, columns: int | None = None, scale: int = 1):
    """The pictures side by side (enlarged `scale` times, pixel for pixel), `columns` per row."""
    from PIL import Image

    columns = columns or min(len(pictures), 4)
    width, height = pictures[0].width * scale, pictures[0].height * scale
    rows = -(-len(pictures) // columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for k, picture in enumerate(pictures):
        grid.paste(picture.resize((width, height), Image.NEAREST), ((k % columns) * width, (k // columns) * height))
    return grid


def check_request(prompt: str, images: int, steps: int, guidance: float) -> None:
    from launch.web import MAX_QUERY_CHARS

    problems = []
    if not prompt.strip():
        problems.append("prompt: empty")
    if len(prompt) > MAX_QUERY_CHARS:
        problems.append(f"prompt: {len(prompt)} characters; at most {MAX_QUERY_CHARS}")
    if not 1 <= images <= MAX_IMAGES:
        problems.append(f"images: {images}; expected 1..{MAX_IMAGES}")
    if not 1 <= steps <= MAX_STEPS:
        problems.append(f"steps: {steps}; expected 1..{MAX_STEPS}")
    if not 0 <= guidance <= 30:
        problems.append(f"guidance: {guidance}; expected 0..30")
    if problems:
        raise ValueError("; ".join(problems))


def generate(model, prompt: str, images: int = 4, steps: int = 20, guidance: float = 3.0, seed: int = 0,
             negative: str | None = None, callback=None, bf16: bool = False) -> list:
    check_request(prompt, images, steps, guidance)
    return model.generate_images([prompt] * images, steps=steps, guidance=guidance,
                                 seed=[seed + k for k in range(images)],
                                 negative_prompt=negative or None, callback=callback, bf16=bf16)


SCRIPT = r"""
const form = document.getElementById('generate'), status = document.getElementById('status'),
      bar = document.getElementById('progress'), grid = document.getElementById('pictures');
form.addEventListener('submit', async (event) => {
  event.preventDefault();
  grid.innerHTML = ''; status.textContent = 'starting...'; bar.value = 0;
  const body = Object.fromEntries(['prompt', 'negative', 'steps', 'guidance', 'seed', 'images'].map(
      (k) => [k, document.getElementById(k).value]));
  const response = await fetch('/api/generate', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                                 body: JSON.stringify(body)});
  const job = await response.json();
  if (!response.ok) { status.textContent = job.detail; return; }
  while (true) {
    const state = await (await fetch(`/api/jobs/${job.id}`)).json();
    bar.max = state.total; bar.value = state.done;
    status.textContent = state.error ? state.error : `sampling: step ${state.done} of ${state.total}`;
    if (state.error) return;
    if (state.finished) {
      status.textContent = `${state.images} pictures`;
      for (let k = 0; k < state.images; k++) {
        const img = document.createElement('img'); img.src = `/api/jobs/${job.id}/${k}.png`;
        img.className = 'picture'; img.width = 192; img.height = 192; img.style.imageRendering = 'pixelated';
        grid.appendChild(img);
      }
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
});
"""

BODY = """
<form id="generate">
  <label>prompt <input type="text" id="prompt" value="a red circle" maxlength="500"></label>
  <label>negative prompt <input type="text" id="negative" value="" maxlength="500"></label>
  <label>steps <input type="number" id="steps" value="20" min="1" max="200"></label>
  <label>guidance <input type="number" id="guidance" value="3" step="0.5" min="0" max="30"></label>
  <label>seed <input type="number" id="seed" value="0"></label>
  <label>pictures <input type="number" id="images" value="4" min="1" max="16"></label>
  <button type="submit" id="go">generate</button>
</form>
<progress id="progress" value="0" max="1"></progress>
<div id="status"></div>
<div class="grid" id="pictures"></div>
"""


def create_app(model, bf16: bool = False):
    """The web page and its API: POST /api/generate starts a job (one at a time on the model), GET /api/jobs/ID
    reports its progress, GET /api/jobs/ID/K.png is its picture K. `bf16`: draw under bfloat16 autocast."""
    from fastapi import HTTPException
    from fastapi.responses import HTMLResponse, Response
    from pydantic import BaseModel

    from launch.web import create_base_app, page, png_bytes

    app = create_base_app("intern25 text to image")
    jobs: dict[str, dict] = {}
    model_lock = threading.Lock()

    class Request(BaseModel):
        prompt: str
        negative: str = ""
        steps: int = 20
        guidance: float = 3.0
        seed: int = 0
        images: int = 4

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        return page("intern25 text to image", BODY, SCRIPT)

    @app.post("/api/generate")
    def start(request: Request) -> dict:
        try:
            check_request(request.prompt, request.images, request.steps, request.guidance)
        except ValueError as error:
            raise HTTPException(400, str(error)) from error
        job_id = uuid.uuid4().hex
        job = jobs[job_id] = {"done": 0, "total": request.steps, "finished": False, "error": None, "pictures": []}
        while len(jobs) > 32:  # old jobs' pictures go
            jobs.pop(next(iter(jobs)))

        def work() -> None:
            try:
                with model_lock:
                    job["pictures"] = generate(model, request.prompt, request.images, request.steps, request.guidance,
                                               request.seed, request.negative,
                                               callback=lambda done, total: job.update(done=done, total=total),
                                               bf16=bf16)
                job["finished"] = True
            except Exception as error:  # reported to the page, not lost in a thread
                job["error"] = f"{type(error).__name__}: {error}"

        threading.Thread(target=work, daemon=True).start()
        return {"id": job_id}

    @app.get("/api/jobs/{job_id}")
    def progress(job_id: str) -> dict:
        job = jobs.get(job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        return {"done": job["done"], "total": job["total"], "finished": job["finished"], "error": job["error"],
                "images": len(job["pictures"])}

    @app.get("/api/jobs/{job_id}/{k}.png")
    def picture(job_id: str, k: int) -> Response:
        job = jobs.get(job_id)
        if job is None or not job["finished"] or not 0 <= k < len(job["pictures"]):
            raise HTTPException(404, "no such picture")
        return Response(png_bytes(job["pictures"][k]), media_type="image/png")

    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python launch/t2i_demo.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved UniPerceiver folder with the diffusion branch")
    parser.add_argument("prompt", nargs="?", help="the prompt (command-line mode)")
    parser.add_argument("--out", default="grid.png", help="the grid of pictures (PNG)")
    parser.add_argument("--negative", default=None, help="a negative prompt")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=4, help="enlarge the grid's pictures this many times")
    parser.add_argument("--serve", action="store_true", help="serve the web page until interrupted")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--device", default=None)
    parser.add_argument("--bf16", action="store_true", help="draw under bfloat16 autocast: 1.3-1.6x as fast on "
                        "a CPU with AVX-512 BF16 (untested on GPUs), pictures a few levels off float32's")
    return parser


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    if not args.serve and not args.prompt:
        raise SystemExit("give a prompt (and --out FILE), or --serve for the web page")
    from uniperceiver import UniPerceiver

    model_folder = Path(args.model)
    if not (model_folder / "config.json").is_file():
        raise SystemExit(f"--model {args.model}: not a saved model folder (no config.json)")
    model = UniPerceiver.from_pretrained(model_folder, device=args.device)
    if not model.has_diffusion:
        raise SystemExit(f"--model {args.model}: the model has no diffusion branch (config.diffusion), so it cannot "
                         "draw")
    if args.serve:
        from launch.web import serve
        print(f"serving the text-to-image page on http://{args.host}:{args.port}/ (Ctrl-C stops)")
        serve(create_app(model, args.bf16), args.host, args.port)
        return None
    try:
        pictures = generate(model, args.prompt, args.images, args.steps, args.guidance, args.seed, args.negative,
                            bf16=args.bf16)
    except ValueError as error:
        raise SystemExit(str(error)) from error
    from launch.training.files import atomic_write

    grid = picture_grid(pictures, scale=args.scale)
    atomic_write(Path(args.out), lambda f: grid.save(f, format="PNG"))
    print(f"{len(pictures)} pictures for {args.prompt!r}: {args.out}")
    return pictures


if __name__ == "__main__":  # the project is installed (pip install -e .), so the script imports it as is
    main()
