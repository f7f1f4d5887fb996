// FER service web page: a photo or the webcam, faces boxed with their emotion probabilities.
// Plain JavaScript, no build step and no dependency. Every request goes to the server that served
// this page, by relative URL (so the page also works behind a reverse proxy's path prefix).
"use strict";

(() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const MAX_FRAME_SIDE = 640;        // webcam frames are sent at most this wide/high
  const JPEG_QUALITY = 0.85;
  const PHOTO_DISPLAY_SIDE = 640;    // a photo's long side on screen (capped by the layout)
  const MAX_BUSY_RETRIES = 3;        // a photo is sent again this often after a 503
  const MATCH_IOU = 0.3;             // webcam over HTTP: a face continues a track when boxes overlap this much
  const SOCKET_OPEN_MS = 5000;       // webcam: a stream not open by then counts as one that cannot open
  const BUSY_RECONNECT_MS = 3000;    // webcam: after "too many streams" (1013), connect again this much later

  const $ = (id) => document.getElementById(id);
  const el = {
    serverStatus: $("server-status"),
    model: $("model"), frontalize: $("frontalize"), frontalizeHint: $("frontalize-hint"), tta: $("tta"),
    keyForm: $("api-key-form"), key: $("api-key"),
    tabPhoto: $("tab-photo"), tabWebcam: $("tab-webcam"),
    panelPhoto: $("panel-photo"), panelWebcam: $("panel-webcam"),
    dropzone: $("dropzone"), pick: $("pick"), file: $("file"),
    photoStatus: $("photo-status"), photoError: $("photo-error"), photoResult: $("photo-result"),
    photoImg: $("photo-img"), photoOverlay: $("photo-overlay"), photoFaces: $("photo-faces"),
    camToggle: $("cam-toggle"), fps: $("fps"), fpsValue: $("fps-value"),
    smooth: $("smooth"), smoothValue: $("smooth-value"),
    camStatus: $("cam-status"), camError: $("cam-error"), camStage: $("cam-stage"),
    video: $("cam-video"), camOverlay: $("cam-overlay"), camFaces: $("cam-faces"),
  };

  const state = {
    apiKey: "",
    ready: null,             // the server's /readyz answer
    modelsLoaded: false,     // GET /models answered (with the key, where one is needed)
    frontalizer: false,      // a frontaliser is loaded: /frontalize answers
    photo: { file: null, token: 0, objectUrl: null },
    cam: { running: false, session: 0, stream: null, socket: null, transport: null, tracks: [],
           nextTrackId: 1, frames: 0, lastAnswerAt: 0, wake: null },
    pendingAfterKey: null,   // what to do once the user has typed an API key
  };

  // ---------------------------------------------------------------- talking to the server

  class ApiFailure extends Error {
    constructor({ status, code, message, retryAfter = null }) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfter = retryAfter;
    }
  }

  function retryAfterSeconds(header) {
    if (!header) return null;
    const seconds = Number(header);
    if (Number.isFinite(seconds)) return Math.max(0, seconds);
    const when = Date.parse(header);
    return Number.isNaN(when) ? null : Math.max(0, (when - Date.now()) / 1000);
  }

  async function api(path, { method = "GET", body, headers = {}, params } = {}) {
    const url = new URL(path, document.baseURI);
    for (const [k, v] of Object.entries(params || {})) url.searchParams.set(k, v);
    const sent = { ...headers };
    if (state.apiKey) sent["X-API-Key"] = state.apiKey;
    const started = performance.now();
    let response;
    try {
      response = await fetch(url, { method, body, headers: sent, cache: "no-store", credentials: "same-origin" });
    } catch (e) {
      throw new ApiFailure({ status: 0, code: "network_error", message: String(e.message || e) });
    }
    let data = null;
    let text = "";
    const type = response.headers.get("content-type") || "";
    try {
      if (type.includes("json")) data = await response.json();
      else text = await response.text();
    } catch (e) {
      if (response.ok) throw new ApiFailure({ status: 0, code: "network_error", message: String(e.message || e) });
    }
    const ms = performance.now() - started;
    if (!response.ok) {
      const err = (data && data.error) || {};
      throw new ApiFailure({
        status: response.status,
        code: err.code || `http_${response.status}`,
        message: err.message || text.trim().slice(0, 300) || response.statusText || "no details",
        retryAfter: retryAfterSeconds(response.headers.get("Retry-After")),
      });
    }
    return { data, ms };
  }

  const LEADS = {
    0: "Could not reach the server",
    400: "The image could not be read",
    401: "This server needs an API key",
    404: "Not found on this server",
    413: "Too large for this server",
    415: "This kind of file is not accepted",
    422: "The request was not understood",
    500: "The server failed",
    501: "Not available on this server",
    503: "The server is busy",
  };

  function describe(err, extra = "") {
    const lead = LEADS[err.status] || `The server answered ${err.status}`;
    const code = err.status ? `${err.status} ${err.code}` : err.code;
    return { lead: `${lead}${extra}`, detail: `${err.message} (${code})` };
  }

  function showError(box, err, extra) {
    const { lead, detail } = describe(err, extra);
    showLines(box, lead, detail);
  }

  function showLines(box, lead, detail) {
    const strong = document.createElement("span");
    strong.textContent = lead;
    const small = document.createElement("span");
    small.className = "error-detail";
    small.textContent = detail;
    box.replaceChildren(strong, small);
    box.hidden = false;
  }

  function showMessage(box, text) {
    box.textContent = text;
    box.hidden = false;
  }

  function clearError(box) {
    box.hidden = true;
    box.replaceChildren();
  }

  function askForKey(onKey) {
    state.pendingAfterKey = onKey;
    el.keyForm.hidden = false;
    el.key.focus();
  }

  function predictParams() {
    return { model: el.model.value || "default", tta: el.tta.checked ? "true" : "false",
             frontalize: el.frontalize.value };
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // ---------------------------------------------------------------- start-up: readiness, models

  async function connect() {
    for (;;) {
      try {
        const { data: ready } = await api("readyz");
        state.ready = ready;
        await loadModels();
        return;
      } catch (err) {
        const wait = err.retryAfter ?? 5;
        el.serverStatus.textContent = err.status === 503
          ? `The models are still loading; asking again in ${Math.ceil(wait)} s…`
          : `${describe(err).lead}; trying again in ${Math.ceil(wait)} s…`;
        await sleep(wait * 1000);
      }
    }
  }

  /** The model list (GET /models). A server with an API key answers it only with the key: then
   *  the key field shows, and the list loads once a key is typed. */
  async function loadModels() {
    const ready = state.ready;
    const summary = `Ready: ${ready.models.length} model${ready.models.length === 1 ? "" : "s"} on ${ready.device}` +
      (ready.backend ? ` (${ready.backend})` : "");
    try {
      const { data: models } = await api("models");
      fillModels(models.models);
      state.modelsLoaded = true;
      el.serverStatus.textContent = summary + (state.frontalizer ? ", frontaliser loaded" : "");
    } catch (err) {
      if (!(err instanceof ApiFailure) || err.status !== 401) throw err;
      el.serverStatus.textContent = `${summary}. This server needs an API key` +
        (state.apiKey ? ` (${err.message})` : ": type it in the API key field");
      el.keyForm.hidden = false;
    }
  }

  function accuracyOf(card) {
    const m = (card && card.metrics && card.metrics.PublicTest) || {};
    const acc = [m.acc, m.acc_weighted, m.acc_average].find((v) => typeof v === "number");
    return acc === undefined ? "" : `, ${(acc * 100).toFixed(1)} %`;
  }

  function fillModels(models) {
    const chosen = el.model.value;
    const classifiers = models.filter((m) => m.role !== "frontalizer");
    state.frontalizer = models.some((m) => m.role === "frontalizer");
    el.model.replaceChildren(...classifiers.map((m) => {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = `${m.name} (${m.arch}${accuracyOf(m.card)})`;
      return option;
    }));
    if (classifiers.some((m) => m.name === chosen)) el.model.value = chosen;
    const on = el.frontalize.querySelector('option[value="on"]');
    on.disabled = !state.frontalizer;
    if (!state.frontalizer) {
      if (el.frontalize.value === "on") el.frontalize.value = "auto";
      el.frontalizeHint.textContent = "No frontaliser is loaded on this server: faces are classified as they are.";
    }
  }

  // ---------------------------------------------------------------- drawing faces

  const pct = (p) => `${(p * 100).toFixed(1)} %`;
  const argmax = (probs) => Object.entries(probs).reduce((a, b) => (b[1] > a[1] ? b : a))[0];

  function yawText(yaw) {
    if (yaw === null || yaw === undefined) return "yaw unknown";
    const side = Math.abs(yaw) < 10 ? "about frontal"
      : `nose towards the image's ${yaw > 0 ? "right" : "left"}`;
    return `yaw ${yaw.toFixed(1)}° (${side})`;
  }

  /** One card per face: title with the dominant emotion, yaw, seven bars, the frontal thumbnail. */
  function faceCard(index, face, probs, title) {
    const dominant = argmax(probs);
    const li = document.createElement("li");
    li.className = "face";
    li.dataset.face = String(index);
    li.dataset.dominant = dominant;

    const head = document.createElement("div");
    head.className = "face-head";
    const h3 = document.createElement("h3");
    h3.className = "face-title";
    h3.textContent = `${title}: ${dominant} (${pct(probs[dominant])})`;
    head.append(h3);
    const figure = document.createElement("figure");
    figure.className = "frontal-figure";
    figure.hidden = true;
    const thumb = document.createElement("img");
    thumb.className = "frontal";
    thumb.alt = `${title}, frontalised`;
    const caption = document.createElement("figcaption");
    caption.textContent = "frontalised";
    figure.append(thumb, caption);
    head.append(figure);

    const meta = document.createElement("p");
    meta.className = "face-meta";
    meta.textContent = `${yawText(face.yaw)} · detection ${face.score.toFixed(2)}` +
      (face.frontalized ? " · classified frontalised" : "");

    const bars = document.createElement("ul");
    bars.className = "bars";
    bars.setAttribute("aria-label", `${title}: probability of each emotion`);
    for (const [name, p] of Object.entries(probs)) {
      const bar = document.createElement("li");
      bar.className = name === dominant ? "bar is-dominant" : "bar";
      bar.dataset.emotion = name;
      bar.dataset.prob = String(p);
      const label = document.createElement("span");
      label.className = "bar-name";
      label.textContent = name;
      const track = document.createElement("span");
      track.className = "bar-track";
      track.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      fill.style.width = `${(Math.max(0, Math.min(1, p)) * 100).toFixed(2)}%`;
      track.append(fill);
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = pct(p);
      bar.append(label, track, value);
      bars.append(bar);
    }
    li.append(head, meta, bars);
    return li;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    return node;
  }

  function drawPhotoOverlay(image, faces) {
    const { width: W, height: H } = image;
    const overlay = el.photoOverlay;
    overlay.setAttribute("viewBox", `0 0 ${W} ${H}`);
    overlay.setAttribute("preserveAspectRatio", "none");
    const font = Math.max(10, Math.round(Math.max(W, H) / 32));
    const dot = Math.max(1.5, Math.max(W, H) / 220);
    const marks = faces.map((face, i) => {
      const [x1, y1, x2, y2] = face.box;
      const g = svg("g", { class: "face-mark", "data-face": i });
      g.append(svg("rect", { class: "face-box-shadow", x: x1, y: y1, width: x2 - x1, height: y2 - y1 }));
      g.append(svg("rect", { class: "face-box", x: x1, y: y1, width: x2 - x1, height: y2 - y1 }));
      for (const [x, y] of face.landmarks || []) g.append(svg("circle", { class: "landmark", cx: x, cy: y, r: dot }));
      const tag = `${i + 1} ${face.dominant} ${Math.round(face.emotions[face.dominant] * 100)}%`;
      const text = svg("text", { class: "face-tag", "font-size": font });
      text.textContent = tag;
      const bg = svg("rect", { class: "face-tag-bg", rx: font * 0.2 });
      g.append(bg, text);
      return { g, bg, text, x1, y1, y2, font };
    });
    overlay.replaceChildren(...marks.map((m) => m.g));
    // Size each tag's background to its rendered text (the overlay is visible by now).
    for (const { bg, text, x1, y1, y2 } of marks) {
      let measured = 0;
      try {
        measured = text.getComputedTextLength();
      } catch {
        measured = 0;
      }
      const tagW = (measured || text.textContent.length * font * 0.62) + font * 0.6;
      const tagH = font * 1.35;
      const tx = Math.min(Math.max(0, x1), Math.max(0, W - tagW));
      const ty = y1 - tagH >= 0 ? y1 - tagH : Math.min(y2, H - tagH);
      for (const [k, v] of Object.entries({ x: tx, y: ty, width: tagW, height: tagH })) bg.setAttribute(k, String(v));
      text.setAttribute("x", String(tx + font * 0.3));
      text.setAttribute("y", String(ty + font * 1.05));
    }
  }

  // ---------------------------------------------------------------- photo

  function sizePhoto(width, height) {
    const scale = PHOTO_DISPLAY_SIDE / Math.max(width, height);
    el.photoImg.style.width = `${Math.round(width * scale)}px`;
  }

  async function analysePhoto(file) {
    if (!file) return;
    selectTab(el.tabPhoto, { focus: false });
    state.photo.file = file;
    const token = ++state.photo.token;
    clearError(el.photoError);
    el.photoStatus.textContent = `Sending ${file.name || "the pasted image"} (${formatBytes(file.size)})…`;
    for (let attempt = 0; ; attempt++) {
      const form = new FormData();
      form.append("file", file, file.name || "pasted-image");
      try {
        const { data, ms } = await api("predict", { method: "POST", body: form, params: predictParams() });
        if (token !== state.photo.token) return;
        await showPhoto(file, data);
        if (token !== state.photo.token) return;
        clearError(el.photoError);
        const n = data.faces.length;
        el.photoStatus.textContent =
          `${n === 0 ? "No face found" : `${n} face${n === 1 ? "" : "s"}`} · model ${data.model.name}` +
          `${data.tta ? " with TTA" : ""} · ${data.image.width}×${data.image.height} px · answered in ${Math.round(ms)} ms`;
        if (state.frontalizer && n > 0) addFrontals(file, data, token);
        return;
      } catch (err) {
        if (token !== state.photo.token) return;
        if (!(err instanceof ApiFailure)) {
          el.photoStatus.textContent = "";
          showMessage(el.photoError, `The page failed to show the answer: ${err.message || err}`);
          return;
        }
        if (err.status === 503 && attempt < MAX_BUSY_RETRIES) {
          const wait = err.retryAfter ?? 2;
          showError(el.photoError, err, `; sending again in ${Math.ceil(wait)} s (Retry-After)`);
          el.photoStatus.textContent = "Waiting for the server…";
          await sleep(wait * 1000);
          if (token !== state.photo.token) return;
          continue;
        }
        el.photoResult.hidden = true;
        el.photoStatus.textContent = "";
        if (err.status === 401) {
          showError(el.photoError, err, ": type it in the API key field above, and the photo is sent again");
          askForKey(() => analysePhoto(file));
        } else if (err.status === 0 && file.size > 1024 * 1024) {
          showError(el.photoError, err,
            ` while sending a ${formatBytes(file.size)} file: it may be larger than this server accepts`);
        } else {
          showError(el.photoError, err);
        }
        return;
      }
    }
  }

  async function showPhoto(file, data) {
    if (state.photo.objectUrl) URL.revokeObjectURL(state.photo.objectUrl);
    state.photo.objectUrl = URL.createObjectURL(file);
    el.photoImg.src = state.photo.objectUrl;
    try {
      await el.photoImg.decode();
    } catch {
      // The server read it but this browser cannot show it (e.g. some BMPs): show the results only.
    }
    sizePhoto(data.image.width, data.image.height);
    el.photoResult.hidden = false;
    drawPhotoOverlay(data.image, data.faces);
    el.photoFaces.replaceChildren(...data.faces.map((f, i) => faceCard(i, f, f.emotions, `Face ${i + 1}`)));
    if (data.faces.length === 0) {
      const li = document.createElement("li");
      li.className = "no-face";
      li.textContent = "No face was found in this image.";
      el.photoFaces.replaceChildren(li);
    }
    el.photoResult.hidden = false;
  }

  function iou(a, b) {
    const ix = Math.max(0, Math.min(a[2], b[2]) - Math.max(a[0], b[0]));
    const iy = Math.max(0, Math.min(a[3], b[3]) - Math.max(a[1], b[1]));
    const inter = ix * iy;
    const union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    return union > 0 ? inter / union : 0;
  }

  /** Frontalised thumbnails beside each card; hidden (as they start) when the server has none. */
  async function addFrontals(file, predicted, token) {
    const form = new FormData();
    form.append("file", file, file.name || "pasted-image");
    let data;
    try {
      ({ data } = await api("frontalize", { method: "POST", body: form }));
    } catch (err) {
      if (err instanceof ApiFailure && err.status === 501) state.frontalizer = false;
      return;  // thumbnails stay hidden: they are an extra, the results are shown already
    }
    if (token !== state.photo.token) return;
    const cards = el.photoFaces.querySelectorAll("li.face");
    predicted.faces.forEach((face, i) => {
      const best = data.faces.reduce((acc, f) => {
        const v = iou(face.box, f.box);
        return v > acc.v ? { v, f } : acc;
      }, { v: 0.5, f: null }).f;
      const figure = cards[i] && cards[i].querySelector(".frontal-figure");
      if (!best || !figure) return;
      figure.querySelector("img").src = `data:image/png;base64,${best.image_png}`;
      figure.hidden = false;
    });
  }

  function formatBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  function firstImageFile(list) {
    const files = Array.from(list || []);
    return files.find((f) => f.type.startsWith("image/")) || files[0] || null;
  }

  el.pick.addEventListener("click", () => el.file.click());
  el.file.addEventListener("change", () => {
    const file = el.file.files && el.file.files[0];
    if (file) analysePhoto(file);
    el.file.value = "";  // choosing the same file again is a new upload
  });
  for (const type of ["dragenter", "dragover"]) {
    window.addEventListener(type, (e) => {
      if (!e.dataTransfer || !Array.from(e.dataTransfer.types || []).includes("Files")) return;
      e.preventDefault();
      e.dataTransfer.dropEffect = "copy";
      el.dropzone.classList.add("dragging");
    });
  }
  window.addEventListener("dragleave", (e) => {
    if (e.relatedTarget === null) el.dropzone.classList.remove("dragging");
  });
  window.addEventListener("drop", (e) => {
    if (!e.dataTransfer || !e.dataTransfer.files || e.dataTransfer.files.length === 0) return;
    e.preventDefault();
    el.dropzone.classList.remove("dragging");
    analysePhoto(firstImageFile(e.dataTransfer.files));
  });
  document.addEventListener("paste", (e) => {
    const items = Array.from((e.clipboardData && e.clipboardData.items) || []);
    const item = items.find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (!item) return;
    e.preventDefault();
    analysePhoto(item.getAsFile());
  });

  // ---------------------------------------------------------------- webcam

  // Frames go over the WebSocket "stream": the server follows each face from frame to frame
  // and smooths its probabilities. Only when that socket cannot open (a proxy without
  // WebSocket support, say) does each frame go to POST /predict, followed and smoothed here.

  const grab = document.createElement("canvas");

  class SocketClosed extends Error {
    constructor(code, reason) {
      super(reason || `the stream closed (code ${code})`);
      this.code = code;
      this.reason = reason;
    }
  }

  const CLOSE_LEADS = {
    1003: "The server could not read a frame",
    1008: "The server refused the stream",
    1009: "A frame was too large for this server",
    1011: "The server failed",
    1013: "The server is busy",
    4400: "The stream's settings were not understood",
  };
  const RECONNECT_CODES = new Set([1001, 1006, 1012, 1013, 4408]);  // going away, lost, busy, idle

  function showClosed(err, extra = "") {
    const lead = `${CLOSE_LEADS[err.code] || "The stream closed"}${extra}`;
    showLines(el.camError, lead, `${err.reason || "no reason given"} (close code ${err.code})`);
  }

  function setCamButton(running) {
    el.camToggle.textContent = running ? "Stop camera" : "Start camera";
    el.camToggle.setAttribute("aria-pressed", running ? "true" : "false");
  }

  async function startCamera() {
    clearError(el.camError);
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      showMessage(el.camError, "This browser gives the page no camera here: open it over HTTPS or on localhost.");
      return;
    }
    el.camStatus.textContent = "Asking for the camera…";
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({
        audio: false, video: { width: { ideal: 640 }, height: { ideal: 480 }, facingMode: "user" } });
    } catch (e) {
      el.camStatus.textContent = "";
      const why = { NotAllowedError: "Camera access was refused.", NotFoundError: "No camera was found.",
                    NotReadableError: "The camera is busy in another program." }[e.name];
      showMessage(el.camError, why || `The camera could not start: ${e.message || e.name}`);
      return;
    }
    state.cam.stream = stream;
    el.video.srcObject = stream;
    el.camStage.hidden = false;
    try {
      await el.video.play();
    } catch {
      // autoplay of a muted stream is allowed; if not, frames still arrive once it plays
    }
    state.cam.running = true;
    setCamButton(true);
    runCamera();
  }

  function closeSocket() {
    const socket = state.cam.socket;
    state.cam.socket = null;
    if (socket && socket.readyState <= WebSocket.OPEN) socket.close(1000, "camera off");
  }

  function stopCamera(reason = "Camera off.") {
    state.cam.running = false;
    state.cam.session++;
    closeSocket();
    if (state.cam.wake) state.cam.wake();
    if (state.cam.stream) for (const t of state.cam.stream.getTracks()) t.stop();
    state.cam.stream = null;
    el.video.srcObject = null;
    el.camStage.hidden = true;
    const ctx = el.camOverlay.getContext("2d");
    ctx.clearRect(0, 0, el.camOverlay.width, el.camOverlay.height);
    setCamButton(false);
    el.camStatus.textContent = reason;
  }

  /** (Re)start sending the running camera's frames: over the socket when it opens, else over HTTP. */
  async function runCamera() {
    closeSocket();
    const session = ++state.cam.session;
    const live = () => state.cam.running && session === state.cam.session;
    state.cam.tracks = [];
    state.cam.frames = 0;
    state.cam.lastAnswerAt = 0;
    el.camStatus.textContent = "Camera on: connecting…";
    let socket;
    try {
      socket = await openSocket();
    } catch {
      if (!live()) return;
      state.cam.transport = "http";
      el.camStatus.dataset.transport = "http";
      el.camStatus.textContent = "Camera on: sending frames…";
      camLoop(session);
      return;
    }
    if (!live()) {
      socket.close(1000, "camera off");
      return;
    }
    state.cam.socket = socket;
    state.cam.transport = "websocket";
    el.camStatus.dataset.transport = "websocket";
    el.camStatus.textContent = "Camera on: streaming frames…";
    streamLoop(session, socket);
  }

  function toBase64Url(text) {
    let binary = "";
    for (const byte of new TextEncoder().encode(text)) binary += String.fromCharCode(byte);
    return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  /** The socket once open; rejects if it cannot open. The API key travels as a subprotocol
   *  (a browser cannot set headers on a WebSocket, and the query string ends up in logs). */
  function openSocket() {
    const url = new URL("stream", document.baseURI);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    for (const [k, v] of Object.entries(predictParams())) url.searchParams.set(k, v);
    url.searchParams.set("smoothing_s", el.smooth.value);
    const protocols = ["fer.stream"];
    if (state.apiKey) protocols.push(`fer.key.${toBase64Url(state.apiKey)}`);
    return new Promise((resolve, reject) => {
      let socket;
      try {
        socket = new WebSocket(url, protocols);
      } catch (e) {
        reject(e);
        return;
      }
      const timer = setTimeout(() => {
        socket.close();
        reject(new Error("the stream did not open in time"));
      }, SOCKET_OPEN_MS);
      socket.onopen = () => {
        clearTimeout(timer);
        socket.onclose = null;
        resolve(socket);
      };
      socket.onclose = (e) => {
        clearTimeout(timer);
        reject(new SocketClosed(e.code, e.reason));
      };
    });
  }

  /** One frame at a time over the socket: the next is sent once the last answer is back, and
   *  frames start at most fps times a second. */
  async function streamLoop(session, socket) {
    const live = () => state.cam.running && session === state.cam.session;
    const link = { waiting: null, closed: null };
    socket.onmessage = (e) => {
      const waiting = link.waiting;
      link.waiting = null;
      if (waiting) waiting.resolve(e.data);
    };
    socket.onclose = (e) => {
      link.closed = new SocketClosed(e.code, e.reason);
      const waiting = link.waiting;
      link.waiting = null;
      if (waiting) waiting.reject(link.closed);
      if (state.cam.wake) state.cam.wake();
    };
    try {
      while (live()) {
        if (link.closed) throw link.closed;
        const started = performance.now();
        let pause = 0;
        const blob = frameReady() ? await grabFrame() : null;
        if (blob && live()) {
          if (link.closed) throw link.closed;
          const answered = new Promise((resolve, reject) => { link.waiting = { resolve, reject }; });
          const sent = performance.now();
          // A socket the server is closing (a refused key, say) is no longer OPEN before its close
          // event arrives; sending then only logs an error. The close event rejects `answered`.
          if (socket.readyState === WebSocket.OPEN) socket.send(blob);
          const answer = JSON.parse(await answered);
          if (!live()) break;
          if (answer.error) {
            pause = (answer.retry_after_s ?? 2) * 1000;
            showLines(el.camError, `The server is busy; next frame in ${Math.ceil(pause / 1000)} s`,
                      `${answer.error.message} (${answer.error.code})`);
          } else {
            clearError(el.camError);
            const tracked = answer.faces.map((f) => ({ id: f.track, box: f.box, face: f, smoothed: f.smoothed }));
            showCamAnswer(answer.image, tracked, performance.now() - sent,
                          answer.dropped_count ? ` · ${answer.dropped_count} dropped` : "");
          }
        }
        const interval = 1000 / Number(el.fps.value);
        await camSleep(Math.max(pause, interval - (performance.now() - started)));
      }
    } catch (err) {
      if (!live()) return;
      if (err instanceof SocketClosed) {
        onStreamClosed(err, session);
        return;
      }
      stopCamera("Camera stopped.");
      showMessage(el.camError, `The page failed to send a frame: ${err.message || err}`);
    } finally {
      if (socket.readyState <= WebSocket.OPEN) socket.close(1000, "camera off");
    }
  }

  async function onStreamClosed(err, session) {
    if (err.code === 1008 && /API key/.test(err.reason)) {
      showLines(el.camError, "This server needs an API key: type it in the API key field above, and the camera goes on",
                `${err.reason} (close code ${err.code})`);
      stopCamera("Camera paused: an API key is needed.");
      askForKey(() => startCamera());
      return;
    }
    if (!RECONNECT_CODES.has(err.code)) {
      stopCamera("Camera stopped.");
      showClosed(err);
      return;
    }
    const wait = err.code === 1013 ? BUSY_RECONNECT_MS : 1000;
    if (err.code !== 4408) showClosed(err, `; connecting again in ${Math.ceil(wait / 1000)} s`);
    el.camStatus.textContent = "Camera on: connecting again…";
    await camSleep(wait);
    if (state.cam.running && session === state.cam.session) runCamera();
  }

  function frameReady() {
    return !document.hidden && el.video.readyState >= 2 && el.video.videoWidth > 0;
  }

  /** The video's current picture as a JPEG, at most MAX_FRAME_SIDE on its long side. */
  async function grabFrame() {
    const vw = el.video.videoWidth;
    const vh = el.video.videoHeight;
    const scale = Math.min(1, MAX_FRAME_SIDE / Math.max(vw, vh));
    grab.width = Math.round(vw * scale);
    grab.height = Math.round(vh * scale);
    grab.getContext("2d").drawImage(el.video, 0, 0, grab.width, grab.height);
    return new Promise((resolve) => grab.toBlob(resolve, "image/jpeg", JPEG_QUALITY));
  }

  /** Wait ``ms``, or less when the camera is stopped meanwhile. */
  function camSleep(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        state.cam.wake = null;
        resolve();
      }
      state.cam.wake = done;
    });
  }

  function showCamAnswer(image, tracked, ms, extra = "") {
    state.cam.frames++;
    const now = performance.now();
    const rate = state.cam.lastAnswerAt ? 1000 / (now - state.cam.lastAnswerAt) : 0;
    state.cam.lastAnswerAt = now;
    drawCamOverlay(image, tracked);
    el.camFaces.replaceChildren(...tracked.map((t, i) => faceCard(i, t.face, t.smoothed, `Face ${t.id}`)));
    const n = tracked.length;
    const how = state.cam.transport === "websocket" ? "WebSocket" : "HTTP";
    el.camStatus.textContent = `Frame ${state.cam.frames}: ${n === 0 ? "no face" : `${n} face${n === 1 ? "" : "s"}`}` +
      ` · answered in ${Math.round(ms)} ms · ${rate.toFixed(1)} frames/s${extra} · ${how}`;
  }

  // ----- the fallback: one POST /predict per frame

  /** One request at a time: a frame is sent only after the previous answer came back, and frames
   *  start at most fps times a second (slower when the server is slower). */
  async function camLoop(session) {
    const live = () => state.cam.running && session === state.cam.session;
    while (live()) {
      const started = performance.now();
      let pause = 0;
      if (frameReady()) {
        try {
          await sendFrame(live);
          clearError(el.camError);
        } catch (err) {
          if (!live()) return;
          if (!(err instanceof ApiFailure)) {
            stopCamera("Camera stopped.");
            showMessage(el.camError, `The page failed to send a frame: ${err.message || err}`);
            return;
          }
          if (err.status === 401) {
            showError(el.camError, err, ": type it in the API key field above, and the camera goes on");
            stopCamera("Camera paused: an API key is needed.");
            askForKey(() => startCamera());
            return;
          }
          if (err.status === 503) {
            pause = (err.retryAfter ?? 2) * 1000;
            showError(el.camError, err, `; next frame in ${Math.ceil(pause / 1000)} s (Retry-After)`);
          } else {
            pause = 2000;
            showError(el.camError, err);
          }
        }
      }
      const interval = 1000 / Number(el.fps.value);
      await camSleep(Math.max(pause, interval - (performance.now() - started)));
    }
  }

  async function sendFrame(live) {
    const blob = await grabFrame();
    if (!blob || !live()) return;
    const { data, ms } = await api("predict", {
      method: "POST", body: blob, headers: { "Content-Type": "image/jpeg" }, params: predictParams() });
    if (!live()) return;
    showCamAnswer(data.image, track(data.faces), ms);
  }

  /** Follow faces across frames by box overlap and smooth each one's probabilities with an
   *  exponential moving average of time constant "Smoothing" seconds (what the stream does). */
  function track(faces) {
    const tau = Number(el.smooth.value);
    const now = performance.now() / 1000;
    const old = state.cam.tracks;
    const pairs = [];
    faces.forEach((f, i) => old.forEach((t) => {
      const v = iou(f.box, t.box);
      if (v >= MATCH_IOU) pairs.push({ v, i, t });
    }));
    pairs.sort((a, b) => b.v - a.v);
    const taken = new Map();
    const used = new Set();
    for (const { i, t } of pairs) {
      if (taken.has(i) || used.has(t)) continue;
      taken.set(i, t);
      used.add(t);
    }
    const tracks = faces.map((f, i) => {
      const t = taken.get(i) || { id: state.cam.nextTrackId++, smoothed: null, seenAt: now };
      const weight = t.smoothed && tau > 0 ? 1 - Math.exp(-(now - t.seenAt) / tau) : 1;
      const smoothed = {};
      for (const [name, p] of Object.entries(f.emotions)) {
        const before = t.smoothed ? t.smoothed[name] ?? p : p;
        smoothed[name] = before + weight * (p - before);
      }
      Object.assign(t, { box: f.box, face: f, smoothed, seenAt: now });
      return t;
    });
    state.cam.tracks = tracks;
    return tracks;
  }

  function drawCamOverlay(image, tracked) {
    const canvas = el.camOverlay;
    const W = el.video.videoWidth || image.width;
    const H = el.video.videoHeight || image.height;
    if (canvas.width !== W || canvas.height !== H) {
      canvas.width = W;
      canvas.height = H;
    }
    const sx = W / image.width;
    const sy = H / image.height;
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, W, H);
    const font = Math.max(12, Math.round(Math.max(W, H) / 30));
    ctx.font = `700 ${font}px system-ui, sans-serif`;
    ctx.lineJoin = "round";
    for (const t of tracked) {
      const [x1, y1, x2, y2] = t.box;
      const [bx, by, bw, bh] = [x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy];
      ctx.lineWidth = 5;
      ctx.strokeStyle = "rgba(0,0,0,0.7)";
      ctx.strokeRect(bx, by, bw, bh);
      ctx.lineWidth = 2.5;
      ctx.strokeStyle = "#ffd400";
      ctx.strokeRect(bx, by, bw, bh);
      ctx.fillStyle = "#00e5ff";
      for (const [x, y] of t.face.landmarks || []) {
        ctx.beginPath();
        ctx.arc(x * sx, y * sy, Math.max(2, W / 220), 0, 2 * Math.PI);
        ctx.fill();
      }
      const dominant = argmax(t.smoothed);
      const tag = `${t.id} ${dominant} ${Math.round(t.smoothed[dominant] * 100)}%`;
      const tw = ctx.measureText(tag).width + font * 0.6;
      const th = font * 1.35;
      const tx = Math.min(Math.max(0, bx), Math.max(0, W - tw));
      const ty = by - th >= 0 ? by - th : Math.min(by + bh, H - th);
      ctx.fillStyle = "#ffd400";
      ctx.fillRect(tx, ty, tw, th);
      ctx.fillStyle = "#111";
      ctx.fillText(tag, tx + font * 0.3, ty + font * 1.05);
    }
    canvas.dataset.faces = String(tracked.length);
  }

  el.camToggle.addEventListener("click", () => {
    if (state.cam.running) stopCamera();
    else startCamera();
  });
  el.fps.addEventListener("input", () => { el.fpsValue.textContent = el.fps.value; });
  el.smooth.addEventListener("input", () => { el.smoothValue.textContent = el.smooth.value; });
  // The stream's settings are fixed when it opens: a change opens a new one (HTTP reads them per frame).
  for (const control of [el.model, el.tta, el.frontalize, el.smooth]) {
    control.addEventListener("change", () => {
      if (state.cam.running && state.cam.transport === "websocket") runCamera();
    });
  }

  // ---------------------------------------------------------------- tabs, settings, key

  const tabs = [el.tabPhoto, el.tabWebcam];

  function selectTab(tab, { focus = true } = {}) {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", on ? "true" : "false");
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !on;
    }
    if (focus) tab.focus();
    if (tab !== el.tabWebcam && state.cam.running) stopCamera("Camera off (the photo view is open).");
  }

  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (e) => {
      const i = tabs.indexOf(tab);
      const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
      if (next === undefined) return;
      e.preventDefault();
      selectTab(tabs[(next + tabs.length) % tabs.length]);
    });
  }

  // Changing a setting analyses the shown photo again with it (the webcam's stream reopens with it).
  for (const control of [el.model, el.tta, el.frontalize]) {
    control.addEventListener("change", () => {
      if (!el.panelPhoto.hidden && state.photo.file && !el.photoResult.hidden) analysePhoto(state.photo.file);
    });
  }

  el.keyForm.addEventListener("submit", (e) => {
    e.preventDefault();
    state.apiKey = el.key.value.trim();
    const then = state.pendingAfterKey;
    state.pendingAfterKey = null;
    if (state.ready && !state.modelsLoaded) loadModels().catch(() => {});  // connect() retries others
    if (then && state.apiKey) then();
  });

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && state.cam.wake) state.cam.wake();
  });

  connect();
})();
