"""The retrieval demo's web page and HTTP API, over a `RetrievalIndex`:

    GET  /                          the page: a query box, an example-picture upload, the hits with scores and boxes
    GET  /api/search?q=TEXT&top=K&regions=0|1     hits as JSON
    POST /api/search_image (multipart "file")    hits for an example picture
    GET  /api/status                counts and the skipped files
    GET  /media/{entry_id}          the picture (or video frame) of an indexed entry, as PNG

Files are served by entry id only, and only when the entry's file lies under an indexed folder: no path from a
request ever reaches the file system.
"""

import io
import threading
from pathlib import Path

from launch.web import MAX_QUERY_CHARS, MAX_UPLOAD_BYTES, create_base_app, page, png_bytes, read_upload

MAX_TOP = 100

SCRIPT = r"""
const form = document.getElementById('search'), grid = document.getElementById('hits'),
      status = document.getElementById('status');
function show(data) {
  grid.innerHTML = '';
  status.textContent = data.hits.length ? `${data.hits.length} hits` : 'no hits';
  for (const [rank, hit] of data.hits.entries()) {
    const cell = document.createElement('div'); cell.className = 'cell hit';
    const frame = document.createElement('div'); frame.className = 'frame';
    const img = document.createElement('img'); img.src = `/media/${hit.entry_id}`; img.alt = hit.path;
    frame.appendChild(img);
    if (hit.box) {
      const scale = 200 / Math.max(hit.width, hit.height);
      const dx = (200 - hit.width * scale) / 2, dy = (200 - hit.height * scale) / 2;
      const box = document.createElement('div'); box.className = 'box';
      box.style.left = `${dx + hit.box[0] * scale}px`; box.style.top = `${dy + hit.box[1] * scale}px`;
      box.style.width = `${(hit.box[2] - hit.box[0]) * scale}px`;
      box.style.height = `${(hit.box[3] - hit.box[1]) * scale}px`;
      frame.appendChild(box);
    }
    const text = document.createElement('div');
    const when = hit.time === null ? '' : ` at ${hit.time.toFixed(1)} s`;
    text.textContent = `#${rank + 1} ${hit.score.toFixed(3)}${when} ${hit.path}`;
    cell.append(frame, text); grid.appendChild(cell);
  }
}
async function run(response) {
  const data = await response.json();
  if (!response.ok) { status.textContent = data.detail || 'error'; grid.innerHTML = ''; return; }
  show(data);
}
form.addEventListener('submit', async (event) => {
  event.preventDefault();
  status.textContent = 'searching...';
  const file = document.getElementById('file').files[0];
  const top = document.getElementById('top').value, regions = document.getElementById('regions').checked ? 1 : 0;
  if (file) {
    const body = new FormData(); body.append('file', file);
    await run(await fetch(`/api/search_image?top=${top}&regions=${regions}`, {method: 'POST', body}));
  } else {
    const q = encodeURIComponent(document.getElementById('q').value);
    await run(await fetch(`/api/search?q=${q}&top=${top}&regions=${regions}`));
  }
});
"""

BODY = f"""
<form id="search">
  <label>query <input type="text" id="q" name="q" maxlength="{MAX_QUERY_CHARS}" placeholder="a red circle"></label>
  <label>or an example picture <input type="file" id="file" accept="image/*"></label>
  <label>top <input type="number" id="top" value="10" min="1" max="{MAX_TOP}"></label>
  <label>regions <input type="checkbox" id="regions"></label>
  <button type="submit" id="go">search</button>
</form>
<div id="status"></div>
<div class="grid" id="hits"></div>
"""


def create_app(index, roots: list[str | Path]):
    """The app over `index`; `roots` are the indexed folders, the only places files are served from."""
    from fastapi import File, HTTPException, Query, UploadFile
    from fastapi.responses import HTMLResponse, Response
    from PIL import Image, UnidentifiedImageError

    from .media import UnreadableMediaError, picture_of

    allowed = [Path(root).expanduser().resolve() for root in roots]
    lock = threading.Lock()  # the model and the SQLite connection serve one request at a time
    app = create_base_app("intern25 retrieval")

    def hits_json(hits) -> dict:
        entries = index.store.entries([hit.entry_id for hit in hits])
        return {"hits": [{**hit.__dict__, "width": entries[hit.entry_id].width,
                          "height": entries[hit.entry_id].height} for hit in hits]}

    def run_search(query, top: int, regions: int) -> dict:
        if not 1 <= top <= MAX_TOP:
            raise HTTPException(400, f"top must be in 1..{MAX_TOP}")
        with lock:
            try:
                return hits_json(index.search(query, top=top, regions=bool(regions)))
            except ValueError as error:
                raise HTTPException(400, str(error)) from error

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        return page("intern25 retrieval", BODY, SCRIPT)

    @app.get("/api/search")
    def search(q: str = Query(..., max_length=MAX_QUERY_CHARS), top: int = 10, regions: int = 0) -> dict:
        if not q.strip():
            raise HTTPException(400, "an empty query")
        return run_search(q, top, regions)

    @app.post("/api/search_image")
    async def search_image(file: UploadFile = File(...), top: int = 10, regions: int = 0) -> dict:
        data = await read_upload(file, MAX_UPLOAD_BYTES)
        try:
            with Image.open(io.BytesIO(data)) as uploaded:
                picture = uploaded.convert("RGB")
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            raise HTTPException(400, f"the upload is not a readable picture ({error})") from error
        return run_search(picture, top, regions)

    @app.get("/api/status")
    def status() -> dict:
        with lock:
            return {"counts": index.store.counts(),
                    "skipped": [{"path": p, "reason": r} for p, r in index.store.skipped_files()]}

    @app.get("/media/{entry_id}")
    def media(entry_id: int) -> Response:
        with lock:
            entry = index.store.entries([entry_id]).get(entry_id)
        if entry is None:
            raise HTTPException(404, f"no entry {entry_id}")
        path = Path(entry.path).resolve()
        if not any(path.is_relative_to(root) for root in allowed):
            raise HTTPException(403, "not under an indexed folder")
        try:
            picture = picture_of(str(path), entry.time)
        except (UnreadableMediaError, FileNotFoundError) as error:
            raise HTTPException(404, f"{path.name}: {error}") from error
        return Response(png_bytes(picture), media_type="image/png")

    return app
