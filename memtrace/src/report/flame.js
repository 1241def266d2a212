// memtrace's flame graph: zoom (click a frame), search (Search, Ctrl-F;
// Escape clears), details of the frame under the pointer. Each frame is a
// <g class="f"> with its layout in data-x, data-w, data-y and its figures in
// data-bytes and data-name. URL parameters: x=ID zooms to frame ID, s=REGEX
// searches, at load.
var details, matched, unzoombtn, frames, total;

function init(evt) {
	details = document.getElementById("details").firstChild;
	matched = document.getElementById("matched").firstChild;
	unzoombtn = document.getElementById("unzoom");
	frames = Array.prototype.slice.call(document.querySelectorAll("g.f"));
	total = parseFloat(document.documentElement.getAttribute("data-total-bytes"));
	frames.forEach(function (g) {
		g.addEventListener("click", function () { zoom(g); });
		g.addEventListener("mouseover", function () {
			details.nodeValue = g.querySelector("title").textContent.replace(/\n/g, "  |  ");
		});
		g.addEventListener("mouseout", function () { details.nodeValue = " "; });
	});
	unzoombtn.addEventListener("click", unzoom);
	document.getElementById("search").addEventListener("click", ask);
	window.addEventListener("keydown", function (e) {
		if ((e.ctrlKey || e.metaKey) && e.key === "f") {
			e.preventDefault();
			ask();
		} else if (e.key === "Escape") {
			clear_search();
		}
	});
	var params = new URLSearchParams(document.location.search);
	var x = params.get("x");
	if (x && document.getElementById(x)) zoom(document.getElementById(x));
	var s = params.get("s");
	if (s) search(s);
	document.documentElement.setAttribute("data-ready", "1");
}

function num(g, k) { return parseFloat(g.getAttribute("data-" + k)); }

function fit(name, w) {
	var room = Math.floor(Math.max(0, w - 6) / 7);
	if (name.length <= room) return name;
	if (room < 3) return "";
	return name.substring(0, room - 2) + "..";
}

function place(g, x, w) {
	var r = g.querySelector("rect"), t = g.querySelector("text");
	r.setAttribute("x", x.toFixed(3));
	r.setAttribute("width", w.toFixed(3));
	t.setAttribute("x", (x + 3).toFixed(3));
	t.textContent = fit(g.getAttribute("data-name"), w);
}

// The frame fills the width; its callees scale with it, its callers span the
// width dimmed, everything else is hidden.
function zoom(node) {
	var x0 = num(node, "x"), w0 = num(node, "w"), y0 = num(node, "y");
	// Rounded layout (0.001 px): neighbours may overlap by that much.
	var scale = (WIDTH - 2 * PAD) / w0, eps = 0.01;
	frames.forEach(function (g) {
		var x = num(g, "x"), w = num(g, "w"), y = num(g, "y");
		g.classList.remove("hide");
		g.classList.remove("parent");
		if (x + w <= x0 + eps || x >= x0 + w0 - eps) {
			g.classList.add("hide");
		} else if (y > y0) {
			g.classList.add("parent");
			place(g, PAD, WIDTH - 2 * PAD);
		} else {
			place(g, PAD + (x - x0) * scale, w * scale);
		}
	});
	unzoombtn.classList.remove("hide");
	document.documentElement.setAttribute("data-zoomed", node.id);
}

function unzoom() {
	frames.forEach(function (g) {
		g.classList.remove("hide");
		g.classList.remove("parent");
		place(g, num(g, "x"), num(g, "w"));
	});
	unzoombtn.classList.add("hide");
	document.documentElement.removeAttribute("data-zoomed");
}

function ask() {
	var re = prompt("Search frames for (a regular expression):", "");
	if (re !== null && re !== "") search(re);
}

// Highlights the frames whose name matches and shows the bytes they hold: a
// match inside another match is not counted twice.
function search(term) {
	var re;
	try {
		re = new RegExp(term);
	} catch (e) {
		matched.nodeValue = "bad expression: " + e.message;
		return;
	}
	var spans = [];
	frames.forEach(function (g) {
		var hit = re.test(g.getAttribute("data-name"));
		g.classList.toggle("match", hit);
		if (hit) spans.push([num(g, "x"), num(g, "x") + num(g, "w"), num(g, "bytes")]);
	});
	// Layout figures are rounded to 0.001 px and no drawn frame is narrower
	// than 0.1 px: a span starting 0.01 px before the last one's end is its
	// neighbour, not inside it.
	spans.sort(function (a, b) { return a[0] - b[0] || b[1] - a[1]; });
	var bytes = 0, end = -1;
	spans.forEach(function (s) {
		if (s[0] >= end - 0.01) {
			bytes += s[2];
			end = s[1];
		}
	});
	var pct = total > 0 ? 100 * bytes / total : 0;
	matched.nodeValue = "Matched: " + pct.toFixed(1) + "% (" + bytes + " bytes)";
	document.documentElement.setAttribute("data-matched-bytes", String(bytes));
}

function clear_search() {
	frames.forEach(function (g) { g.classList.remove("match"); });
	matched.nodeValue = " ";
	document.documentElement.removeAttribute("data-matched-bytes");
}
