"""The web demo page served at `/`: upload an image → captions, tags and boxes drawn on it; a sentence → images.

One self-contained HTML document (no external scripts, fonts or CDNs: the page works on an offline cluster). It
talks only to this app's JSON API; an optional bearer token typed into the page is sent with every call.
Element ids (`#file`, `#caption-btn`, `#captions`, `#tags`, `#canvas`, `#query`, `#search-btn`, `#results`,
`#error`) are what the browser test drives.
"""

DEMO_PAGE = """<!doctype html>
<html lang="zh">
<head>
<meta charset="utf-8">
<title>Mengzi-Oscar 演示</title>
<style>
 body { font-family: "WenQuanYi Micro Hei", sans-serif; margin: 2em; max-width: 60em; }
 section { border: 1px solid #ccc; padding: 1em; margin-bottom: 1em; border-radius: 6px; }
 #error { color: #b00; }
 #results li { display: inline-block; margin: 0.5em; text-align: center; }
 #results img { width: 96px; height: 96px; display: block; border: 1px solid #ddd; }
 canvas { border: 1px solid #ddd; max-width: 100%; }
 .tag { background: #eef; padding: 0 0.4em; margin-right: 0.3em; border-radius: 3px; }
</style>
</head>
<body>
<h1>Mengzi-Oscar：看图说话与图文检索</h1>
<p>Token (optional): <input id="token" type="password" size="24"></p>
<p id="error" role="alert"></p>
<section>
 <h2>上传图片 → 描述</h2>
 <input id="file" type="file" accept="image/*">
 <label>beams <input id="beams" type="number" min="1" value="3" style="width:4em"></label>
 <button id="caption-btn">生成描述</button>
 <ol id="captions"></ol>
 <p id="tags"></p>
 <canvas id="canvas" width="1" height="1" data-boxes="0"></canvas>
</section>
<section>
 <h2>输入句子 → 图片</h2>
 <input id="query" type="text" size="40" placeholder="红色的圆形在蓝色的正方形左边">
 <button id="search-btn">搜索图片</button>
 <ol id="results"></ol>
</section>
<script>
const $ = (id) => document.getElementById(id);
function headers(extra) {
  const h = Object.assign({}, extra || {});
  const token = $("token").value.trim();
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}
async function call(path, options) {
  $("error").textContent = "";
  const response = await fetch(path, options);
  const isJson = (response.headers.get("content-type") || "").includes("application/json");
  const body = isJson ? await response.json() : { error: { message: await response.text() } };
  if (!response.ok) {
    const e = body.error || {};
    throw new Error(response.status + " " + (e.code || "") + ": " + (e.message || response.statusText));
  }
  if (!isJson) throw new Error(response.status + ": the server did not answer JSON");
  return body;
}
function drawBoxes(file, result) {
  const img = new Image();
  img.onload = () => {
    const canvas = $("canvas");
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0);
    ctx.lineWidth = Math.max(1, img.naturalWidth / 200);
    ctx.font = Math.max(10, img.naturalWidth / 30) + "px sans-serif";
    for (const b of result.boxes || []) {
      const [x1, y1, x2, y2] = b.box;
      ctx.strokeStyle = "#e0218a"; ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      ctx.fillStyle = "#e0218a"; ctx.fillText(b.tag, x1 + 2, y1 + 12);
    }
    canvas.dataset.boxes = String((result.boxes || []).length);
    URL.revokeObjectURL(img.src);
  };
  img.src = URL.createObjectURL(file);
}
$("caption-btn").addEventListener("click", async () => {
  const file = $("file").files[0];
  if (!file) { $("error").textContent = "请选择一张图片"; return; }
  const form = new FormData();
  form.append("image", file);
  form.append("num_beams", $("beams").value);
  try {
    const result = await call("/v1/caption", {method: "POST", body: form, headers: headers()});
    $("captions").innerHTML = "";
    for (const c of result.captions) {
      const li = document.createElement("li");
      li.textContent = c.text + " (" + c.score.toFixed(3) + ")";
      $("captions").appendChild(li);
    }
    $("tags").innerHTML = "";
    for (const t of result.tags) {
      const span = document.createElement("span"); span.className = "tag"; span.textContent = t;
      $("tags").appendChild(span);
    }
    drawBoxes(file, result);
  } catch (e) { $("error").textContent = e.message; }
});
async function thumbnail(imageId, li) {
  const response = await fetch("/v1/gallery/images/" + imageId, {headers: headers()});
  if (!response.ok) return;
  const img = document.createElement("img");
  img.alt = imageId;
  img.src = URL.createObjectURL(await response.blob());
  li.prepend(img);
}
$("search-btn").addEventListener("click", async () => {
  try {
    const result = await call("/v1/search/images", {
      method: "POST", headers: headers({"Content-Type": "application/json"}),
      body: JSON.stringify({text: $("query").value, k: 8}),
    });
    $("results").innerHTML = "";
    for (const r of result.results) {
      const li = document.createElement("li");
      li.className = "hit"; li.dataset.imageId = r.image_id;
      li.appendChild(document.createTextNode(r.image_id + " " + r.score.toFixed(3)));
      $("results").appendChild(li);
      thumbnail(r.image_id, li);
    }
  } catch (e) { $("error").textContent = e.message; }
});
</script>
</body>
</html>
"""
