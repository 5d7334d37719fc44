// Keyboard-first grading. Every choice, submit and skip has a key (listed in the side panel).
(function () {
  "use strict";
  var task = document.getElementById("task");
  if (!task) return;
  var form = document.getElementById("label-form");
  var sideBySide = task.dataset.kind === "side_by_side";
  var history = document.getElementById("history");  // earlier turns of a conversation
  var aspects = Array.prototype.slice.call(document.querySelectorAll(".aspect"));
  var current = 0;

  function focusAspect(i) {
    if (!aspects.length) return;
    current = Math.max(0, Math.min(aspects.length - 1, i));
    aspects.forEach(function (el, j) { el.classList.toggle("active", j === current); });
    aspects[current].focus();
  }
  function pick(input) {  // as a click would: checked, and the form hears of it
    input.checked = true;
    input.dispatchEvent(new Event("change", { bubbles: true }));
  }
  function typing(el) {
    return el && (el.tagName === "TEXTAREA" || (el.tagName === "INPUT" && el.type === "text") ||
                  el.name === "reason");
  }

  document.addEventListener("keydown", function (e) {
    if (e.altKey || e.metaKey) return;
    var target = e.target;
    if (typing(target)) {
      if (e.key === "Escape") { target.blur(); focusAspect(current); e.preventDefault(); }
      else if (e.key === "Enter" && target.id === "comment" && e.ctrlKey) { form.requestSubmit(); e.preventDefault(); }
      return;  // Enter in the skip box submits the skip form natively
    }
    if (e.ctrlKey) return;
    var key = e.key;
    if (sideBySide && /^[0-9]$/.test(key)) {
      var radio = form.querySelector('input[data-key="' + key + '"]');
      if (radio) { pick(radio); radio.focus(); e.preventDefault(); }
    } else if (!sideBySide && /^[1-5]$/.test(key)) {
      var input = aspects[current] && aspects[current].querySelector('input[value="' + key + '"]');
      if (input) { pick(input); focusAspect(current + 1); e.preventDefault(); }
    } else if (!sideBySide && (key === "ArrowDown" || key === "j")) { focusAspect(current + 1); e.preventDefault(); }
    else if (!sideBySide && (key === "ArrowUp" || key === "k")) { focusAspect(current - 1); e.preventDefault(); }
    else if (!sideBySide && key === "u") { var u = document.getElementById("unsafe"); u.checked = !u.checked; e.preventDefault(); }
    else if (!sideBySide && key === "c") { document.getElementById("comment").focus(); e.preventDefault(); }
    else if (key === "Enter") { form.requestSubmit(); e.preventDefault(); }
    else if (key === "s") { document.getElementById("skip-reason").focus(); e.preventDefault(); }
    else if (key === "h" && history) { history.open = !history.open; e.preventDefault(); }
    else if (key === "g") { document.getElementById("guidelines").classList.toggle("hidden"); e.preventDefault(); }
  });
  // Mistakes are told on the page, before anything is sent (the server refuses them too).
  var error = document.getElementById("task-error");
  var reason = document.getElementById("skip-reason");
  function say(message) { error.textContent = message; error.hidden = false; }
  function unscored() {
    return aspects.filter(function (el) { return !el.querySelector("input:checked"); });
  }
  function problem() {
    if (sideBySide) {
      return form.querySelector('input[name="choice"]:checked') ? "" :
        "Choose how the two responses compare first: 1–4 A is better, 5 or 6 a tie, " +
        "7–0 B is better. Then press Enter.";
    }
    var left = unscored();
    if (!left.length) return "";
    var names = left.map(function (el) { return el.dataset.name; }).join(", ");
    return "Give a score from 1 to 5 for " + names + ", then press Enter.";
  }
  form.addEventListener("submit", function (e) {
    var message = problem();
    if (!message) return;
    e.preventDefault();
    say(message);
    var left = unscored();
    if (left.length) focusAspect(aspects.indexOf(left[0]));
  });
  form.addEventListener("change", function () { if (!problem()) error.hidden = true; });
  document.getElementById("skip-form").addEventListener("submit", function (e) {
    if (reason.value.trim()) return;
    e.preventDefault();
    say("Say why you skip this task: type a reason, then Enter (Esc goes back to the task).");
    reason.focus();
  });
  focusAspect(0);
  document.body.dataset.keysReady = "1";  // tests (and scripts) wait for this
})();
