// The new-campaign form: aspects matter to single-sided campaigns only, so they show with it.
(function () {
  "use strict";
  var form = document.getElementById("campaign-form");
  if (!form) return;
  var aspects = document.getElementById("aspects-fieldset");
  function update() {
    var kind = form.querySelector('input[name="kind"]:checked');
    aspects.hidden = !kind || kind.value !== "single_sided";
  }
  form.addEventListener("change", update);
  update();
})();
