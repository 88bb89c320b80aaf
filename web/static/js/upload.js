// Upload form: drag-and-drop zone with a preview of the chosen image.
(function () {
  "use strict";
  var zone = document.getElementById("dropzone");
  var input = document.getElementById("image");
  var preview = document.getElementById("preview");
  var empty = document.getElementById("dropzone-empty");
  var nameEl = document.getElementById("file-name");
  var form = document.getElementById("job-form");
  var submit = document.getElementById("submit");
  if (!zone || !input) return;
  var currentUrl = null;

  function show(file) {
    if (currentUrl) { URL.revokeObjectURL(currentUrl); currentUrl = null; }
    if (!file) {
      preview.hidden = true; nameEl.hidden = true; empty.hidden = false;
      zone.classList.remove("has-file");
      return;
    }
    nameEl.textContent = file.name + " · " + Math.max(1, Math.round(file.size / 1024)) + " KiB";
    nameEl.hidden = false;
    zone.classList.add("has-file");
    if (file.type && file.type.indexOf("image/") === 0) {
      currentUrl = URL.createObjectURL(file);
      preview.src = currentUrl;
      preview.hidden = false;
      empty.hidden = true;
    } else {
      preview.hidden = true;
      empty.hidden = false;
    }
  }

  input.addEventListener("change", function () { show(input.files && input.files[0]); });
  preview.addEventListener("error", function () { preview.hidden = true; empty.hidden = false; });

  ["dragenter", "dragover"].forEach(function (type) {
    zone.addEventListener(type, function (e) {
      e.preventDefault();
      zone.classList.add("dragging");
    });
  });
  ["dragleave", "dragend", "drop"].forEach(function (type) {
    zone.addEventListener(type, function () { zone.classList.remove("dragging"); });
  });
  zone.addEventListener("drop", function (e) {
    e.preventDefault();
    var files = e.dataTransfer && e.dataTransfer.files;
    if (!files || !files.length) return;
    try {
      var dt = new DataTransfer();
      dt.items.add(files[0]);
      input.files = dt.files;
    } catch (err) {
      input.files = files;
    }
    show(input.files[0]);
  });

  if (form && submit) {
    form.addEventListener("submit", function () {
      submit.disabled = true;
      submit.textContent = "Uploading…";
    });
  }
  if (input.files && input.files[0]) show(input.files[0]);
})();
