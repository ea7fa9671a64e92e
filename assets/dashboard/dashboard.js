// Tally usage dashboard: reads the account's balance, summary and 3-month usage from the
// /v1 API with a bearer token, and draws them (uPlot for the graph). Figures are decimal
// strings from the API; they are cut (never rounded up) for display, and only the graph
// turns them into numbers.
//
// The token: given once in the URL fragment (#token=...), which browsers never send to a
// server or put in a Referer; it is kept in sessionStorage (this tab only) and removed from
// the address bar. Without one, the page asks for it.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const KEY = "tally.dashboard.token";
  const parts = location.pathname.split("/").filter(Boolean);
  const account = decodeURIComponent(parts[parts.length - 1] || "");
  const api = "../v1/accounts/" + encodeURIComponent(account);

  function takeToken() {
    const fragment = new URLSearchParams(location.hash.slice(1));
    const given = fragment.get("token");
    if (given) {
      sessionStorage.setItem(KEY, given);
      history.replaceState(null, "", location.pathname + location.search);
    }
    return sessionStorage.getItem(KEY);
  }

  // "12345.678900" -> "12,345.67": cut to `places`, trailing zeros dropped, thousands grouped.
  function fmt(value, places) {
    if (value === null || value === undefined) return "–";
    let s = String(value);
    const negative = s.startsWith("-");
    if (negative) s = s.slice(1);
    let [int, frac = ""] = s.split(".");
    frac = frac.slice(0, places === undefined ? 2 : places).replace(/0+$/, "");
    int = int.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
    const out = frac ? int + "." + frac : int;
    return (negative && /[1-9]/.test(out) ? "-" : "") + out;
  }

  function isZero(value) {
    return !/[1-9]/.test(String(value));
  }

  function day(iso) {
    // "2025-06-15" -> "Sun 15 Jun 2025" (UTC)
    const d = new Date(iso + "T00:00:00Z");
    return d.toLocaleDateString("en-GB", {
      weekday: "short", day: "numeric", month: "short", year: "numeric", timeZone: "UTC",
    });
  }

  function text(id, value) {
    $(id).textContent = value;
  }

  class HttpError extends Error {
    constructor(status, body) {
      super((body && body.error && body.error.message) || "HTTP " + status);
      this.status = status;
    }
  }

  async function get(token, path) {
    const response = await fetch(path, {
      headers: { Authorization: "Bearer " + token, Accept: "application/json" },
      cache: "no-store",
      credentials: "omit",
    });
    const body = await response.json().catch(() => null);
    if (!response.ok) throw new HttpError(response.status, body);
    return body;
  }

  function renderBalance(b) {
    const pill = $("balance-pill");
    pill.dataset.value = b.spendable;
    pill.dataset.total = b.purchased.total;
    pill.dataset.overage = b.overage;
    let state = "ok";
    // Remaining of total purchased (docs/api.md: the original credits of the active grants).
    let label = fmt(b.spendable) + " / " + fmt(b.purchased.total) + " credits remaining";
    if (!isZero(b.overage)) {
      state = "overage";
      label += " · overage " + fmt(b.overage);
    } else if (isZero(b.spendable)) {
      state = "empty";
    } else if (b.allowance && Number(b.allowance.used_percent) >= 80) {
      state = "low";
    }
    pill.className = "pill " + state;
    pill.dataset.status = state;
    pill.textContent = label;
    pill.title = "Spendable credits: " + b.spendable + " of " + b.purchased.total +
      " purchased (" + b.purchased.grants + " active grant" + (b.purchased.grants === 1 ? "" : "s") +
      ")" + (b.next_expiry
      ? " — next expiry " + fmt(b.next_expiry.credits) + " on " + b.next_expiry.at.slice(0, 10)
      : "");

    // The price of each model in the price-table version in force.
    const list = $("prices");
    list.replaceChildren();
    const models = b.prices ? b.prices.models : [];
    list.dataset.version = b.prices ? b.prices.version : "";
    for (const m of models) {
      const li = document.createElement("li");
      const variant = Object.entries(m.match).map(([k, v]) => ", " + k + "=" + v).join("");
      const one = Number(m.credits_per_unit) === 1;
      li.textContent = m.model + " (" + m.kind + variant + "): " + fmt(m.credits_per_unit, 6) +
        (one ? " credit per " : " credits per ") + m.unit;
      li.dataset.rule = m.rule_id;
      li.dataset.value = m.credits_per_unit;
      list.append(li);
    }
    if (!models.length) {
      const li = document.createElement("li");
      li.textContent = "No model prices in force.";
      list.append(li);
    }

    const gauge = $("gauge-value");
    if (b.allowance) {
      const percent = Number(b.allowance.used_percent || 0);
      gauge.setAttribute("stroke-dasharray", Math.min(percent, 100) + " 100");
      gauge.classList.toggle("warn", percent >= 80 && percent < 100);
      gauge.classList.toggle("bad", percent >= 100);
      text("gauge-label", fmt(b.allowance.used_percent, 1) + "%");
      $("gauge-label").dataset.value = b.allowance.used_percent;
      text("allowance-text", fmt(b.allowance.used) + " of " + fmt(b.allowance.granted) +
        " credits used (" + fmt(b.allowance.remaining) + " left)");
    } else {
      text("gauge-label", "–");
      text("allowance-text", "No plan: prepaid credits only.");
    }
    if (b.cycle && b.days_until_reset !== null) {
      $("reset-text").dataset.days = b.days_until_reset;
      text("reset-text", "Resets in " + b.days_until_reset + " day" +
        (b.days_until_reset === 1 ? "" : "s") + " (" + day(b.cycle.end.slice(0, 10)) + ")");
    }
  }

  function renderSummary(s) {
    const p = s.projection;
    $("projection-total").dataset.value = p.projected_total;
    text("projection-total", fmt(p.projected_total) + " credits");
    text("projection-text", "used by the end of this cycle at " + fmt(p.pace_per_day) +
      " credits/day for the " + p.days_left + " day" + (p.days_left === 1 ? "" : "s") +
      " after today (resets " + day(p.reset) + ").");
    const runout = $("runout-text");
    if (p.runs_out_on) {
      runout.dataset.value = p.runs_out_on;
      runout.textContent = "Balance runs out on " + day(p.runs_out_on) +
        (p.runs_out_before_reset ? " — before the reset." : ".");
      runout.classList.toggle("warn-text", p.runs_out_before_reset);
    } else {
      runout.textContent = "Balance lasts at this pace.";
    }
    $("average-text").dataset.value = s.average_daily;
    text("average-text", "Average " + fmt(s.average_daily) + " credits/day this cycle (" +
      s.cycle.days_elapsed + " day" + (s.cycle.days_elapsed === 1 ? "" : "s") + ")");

    const body = $("peaks").tBodies[0];
    body.replaceChildren();
    for (const d of s.peak_days.days) {
      const row = body.insertRow();
      row.dataset.day = d.day;
      row.dataset.credits = d.credits;
      row.insertCell().textContent = day(d.day);
      const credits = row.insertCell();
      credits.className = "num";
      credits.textContent = fmt(d.credits);
      const events = row.insertCell();
      events.className = "num";
      events.textContent = d.events.toLocaleString("en-US");
    }
    if (!s.peak_days.days.length) {
      body.insertRow().insertCell().textContent = "No usage yet.";
    }
  }

  function renderCounts(u) {
    const c = u.counts;
    const rows = [
      ["Credits", fmt(c.credits), "credits", c.credits],
      ["Calls", c.calls.toLocaleString("en-US"), "calls", c.calls],
      ["Call minutes", fmt(c.call_minutes, 1), "call-minutes", c.call_minutes],
      ["Chats", c.chats.toLocaleString("en-US"), "chats", c.chats],
      ["AI responses", c.ai_responses.toLocaleString("en-US"), "ai-responses", c.ai_responses],
      ["Instance hours", fmt(c.instance_hours, 1), "instance-hours", c.instance_hours],
    ];
    const dl = $("counts");
    dl.replaceChildren();
    for (const [label, shown, id, raw] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = label;
      const dd = document.createElement("dd");
      dd.textContent = shown;
      dd.dataset.testid = id;
      dd.dataset.value = raw;
      dl.append(dt, dd);
    }
  }

  function renderChart(u, s) {
    const average = new Map(s.trend.days.map((d) => [d.day, Number(d.moving_average_7d)]));
    const xs = [], credits = [], avg = [];
    for (const point of u.series) {
      xs.push(Date.parse(point.start + "T00:00:00Z") / 1000);
      // A day without usage draws no bar.
      credits.push(isZero(point.credits) ? null : Number(point.credits));
      avg.push(average.has(point.start) ? average.get(point.start) : null);
    }
    const el = $("chart");
    el.replaceChildren();
    el.dataset.days = xs.length;
    el.dataset.total = u.totals.credits;
    el.dataset.from = u.from;
    el.dataset.to = u.to;
    const options = {
      width: Math.max(el.clientWidth, 600),
      height: 300,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
      scales: { x: { time: true }, y: { range: (self, min, max) => [0, Math.max(max, 1) * 1.1] } },
      series: [
        {},
        {
          label: "Credits", stroke: "#2e6bd9", fill: "rgba(46,107,217,0.35)",
          paths: uPlot.paths.bars({ size: [0.8, 24] }), points: { show: false },
          value: (self, v) => (v === null ? "–" : v.toLocaleString("en-US", { maximumFractionDigits: 2 })),
        },
        {
          label: "7-day average", stroke: "#f79009", width: 2, points: { show: false },
          value: (self, v) => (v === null ? "–" : v.toLocaleString("en-US", { maximumFractionDigits: 2 })),
        },
      ],
      axes: [{}, { size: 64 }],
    };
    new uPlot(options, [xs, credits, avg], el);
  }

  async function load(token) {
    const [balance, summary] = await Promise.all([
      get(token, api + "/balance"),
      get(token, api + "/summary"),
    ]);
    const usage = await get(token, api + "/usage?granularity=day&from=" +
      encodeURIComponent(summary.trend.from) + "&to=" + encodeURIComponent(summary.as_of));
    renderBalance(balance);
    renderSummary(summary);
    renderCounts(usage);
    renderChart(usage, summary);
    document.body.dataset.asOf = balance.as_of;
  }

  function fail(message) {
    const el = $("error");
    el.textContent = message;
    el.hidden = false;
    document.body.dataset.state = "error";
  }

  async function start() {
    text("account", account);
    document.title = account + " · Usage · Tally";
    const token = takeToken();
    if (!token) {
      $("auth").hidden = false;
      document.body.dataset.state = "needs-token";
      return;
    }
    try {
      await load(token);
      $("error").hidden = true;
      document.body.dataset.state = "ready";
    } catch (e) {
      if (e.status === 401) {
        sessionStorage.removeItem(KEY);
        $("auth").hidden = false;
        fail("The token was refused. Enter a token for this account.");
      } else if (e.status === 404) {
        fail("Account " + account + " not found.");
      } else {
        fail("Could not load usage: " + e.message);
      }
    }
  }

  $("auth").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("token").value.trim());
    $("auth").hidden = true;
    start();
  });
  start();
})();
